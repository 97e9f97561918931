"""What a finished run hands over: the models it can answer with, by name.

``retain serve`` and ``retain export`` both start here. A run offers:

- ``final``: the model as the run ended (for per-task methods, the latest task's adapter, as
  the probe was scored);
- one name per task for methods that keep per-task parameters (``lora-per-task``,
  ``adapter-per-task``, ...): that task's parameters, exactly as R scored them;
- ``merged-<method>`` for each merged adapter the run saved (``lora-per-task+merge``);
- ``base``: the base model with every adapter switched off, when the trained parameters are
  PEFT adapters (a fully fine-tuned model has no base left to switch to);
- ``auto`` when the run has a task router: each input goes to the task whose centroid is
  nearest, the routing ``retain generate`` and the task-agnostic evaluation use.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from retain.errors import RetainError

FINAL, BASE, AUTO = "final", "base", "auto"


@dataclass
class Offer:
    """One servable model: how to switch to it and what it is."""

    name: str
    kind: str  # final | task | merged | base
    use: Callable[[], ContextManager]
    description: str


@dataclass
class HandedOver:
    """A restored run and the models it offers."""

    run_dir: Path
    ctx: Any
    stack: Any
    results: dict[str, Any]
    offers: dict[str, Offer] = field(default_factory=dict)

    @property
    def router(self):
        router = self.stack.task_router()
        return router if router is not None and router.centroids else None

    @property
    def names(self) -> list[str]:
        return [*self.offers, *([AUTO] if self.router is not None else [])]

    def offer(self, name: str) -> Offer:
        if name not in self.offers:
            raise KeyError(name)
        return self.offers[name]

    def route(self, texts: list[str]) -> list[str]:
        """The task adapter each input goes to (``auto``)."""
        return self.router.predict(self.ctx, texts)


def peft_model(model) -> Any | None:
    """The PEFT wrapper of ``model``, or None for a model without PEFT adapters."""
    from peft import PeftModel

    return model if isinstance(model, PeftModel) else None


def load(run_dir: str | Path) -> HandedOver:
    """Restore a finished run (base, trained tensors, adapters) and list what it offers."""
    from retain.loop import restore
    from retain.reporting import load_results
    from retain.strategies._lora import use_adapter

    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        if (run_dir / "aggregate.json").is_file():
            raise RetainError(f"{run_dir} is a multi-seed run; name one of its seeds, e.g. {run_dir / 'seed-0'}")
        raise RetainError(f"{run_dir} is not a finished run (no results.json); finish it with "
                          f"`retain run --resume {run_dir}`")
    results = load_results(run_dir)
    ctx, stack = restore(run_dir)
    ctx.model.eval()
    out = HandedOver(run_dir, ctx, stack, results)
    model = ctx.accelerator.unwrap_model(ctx.model)
    out.offers[FINAL] = Offer(FINAL, "final", lambda: stack.route(ctx, None),
                              f"the model as run '{results['name']}' ended ({results['strategy']})")
    if any(getattr(s, "scores_per_task", False) for s in stack.strategies):
        for task in ctx.stream.task_names:
            out.offers[task] = Offer(task, "task", lambda task=task: stack.route(ctx, task),
                                     f"task '{task}': its own parameters, as R scored it")
    peft = peft_model(model)
    if peft is not None:
        for folder in sorted((run_dir / "adapters").glob("merged-*")):
            if (folder / "adapter_config.json").is_file():
                if folder.name not in peft.peft_config:
                    peft.load_adapter(str(folder), adapter_name=folder.name)
                out.offers[folder.name] = Offer(folder.name, "merged",
                                                lambda name=folder.name: use_adapter(peft, name),
                                                f"the task adapters merged by {folder.name[len('merged-'):]}")
        out.offers[BASE] = Offer(BASE, "base", peft.disable_adapter, "the base model, every adapter off")
    return out


def adapter_folders(run_dir: Path) -> dict[str, Path]:
    """The run's adapters that PEFT can load on its own (``adapters/<name>/`` with a LoRA config)."""
    found = {}
    for folder in sorted((Path(run_dir) / "adapters").glob("*")):
        config = folder / "adapter_config.json"
        if config.is_file():
            try:
                peft_type = json.loads(config.read_text(encoding="utf-8")).get("peft_type")
            except json.JSONDecodeError:
                continue
            if peft_type is not None:
                found[folder.name] = folder
    return found


@contextlib.contextmanager
def using(handed: HandedOver, name: str):
    with handed.offer(name).use():
        yield
