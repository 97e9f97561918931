"""Houlsby bottleneck adapters, one set per task, base frozen.

In every block, the output h of the attention projection and of the MLP's down
projection (before the block's residual add, where Houlsby et al. place them) becomes
h + up(act(down(h))). ``up`` starts at zero, so a fresh adapter is exactly the identity
and the model starts from the base. Each task trains its own adapters; scoring task j
switches every layer to adapter j, and a router picks one when no task is given.

Written as a small module of our own: PEFT has no bottleneck adapter, and AdapterHub's
``adapters`` package pins transformers versions older than the one this project uses.
Saved per task as ``adapters/<task>/adapter_model.safetensors`` + ``adapter_config.json``;
``load_adapter`` puts one back on a freshly loaded base model.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from retain.io import atomic_write_dir
from retain.routing import TaskRouter
from retain.strategies.base import Context, Strategy, register

_ACT = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU, "silu": torch.nn.SiLU}


class AdapterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bottleneck: int = Field(default=32, ge=1, description="width of the down-projection")
    activation: Literal["gelu", "relu", "silu"] = "gelu"
    target_modules: list[str] = Field(default_factory=lambda: ["o_proj", "down_proj"], min_length=1,
                                      description="linear layers whose output gets an adapter")


class Bottleneck(torch.nn.Module):
    def __init__(self, width: int, bottleneck: int, activation: str) -> None:
        super().__init__()
        self.down = torch.nn.Linear(width, bottleneck)
        self.act = _ACT[activation]()
        self.up = torch.nn.Linear(bottleneck, width)
        torch.nn.init.zeros_(self.up.weight)  # the identity at initialization
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdapterSlot(torch.nn.Module):
    """A linear layer followed by the active task's bottleneck adapter (none: the layer alone)."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.adapters = torch.nn.ModuleDict()
        self.active: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return self.adapters[self.active](h) if self.active is not None else h


def slots(model: torch.nn.Module) -> list[AdapterSlot]:
    return [m for m in model.modules() if isinstance(m, AdapterSlot)]


def insert_slots(model: torch.nn.Module, targets: list[str]) -> int:
    """Wrap every ``nn.Linear`` whose attribute name is in ``targets``; returns how many."""
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, torch.nn.Linear):
                setattr(parent, name, AdapterSlot(child))
                wrapped += 1
    if not wrapped:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"adapter.target_modules {targets} match no linear layer; linear layers here: {', '.join(names)}")
    return wrapped


def add_adapter(model: torch.nn.Module, name: str, options: AdapterOptions) -> None:
    for slot in slots(model):
        if name not in slot.adapters:
            ref = slot.base.weight
            slot.adapters[name] = Bottleneck(slot.base.out_features, options.bottleneck, options.activation).to(
                device=ref.device, dtype=ref.dtype)


def set_active(model: torch.nn.Module, name: str | None) -> None:
    for slot in slots(model):
        slot.active = name


def adapter_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if f".adapters.{name}." in k}


def save_adapter(model: torch.nn.Module, name: str, options: AdapterOptions, dest: Path) -> Path:
    tensors = {k.replace(f".adapters.{name}.", ".adapters.ADAPTER."): v for k, v in adapter_state(model, name).items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps({"type": "bottleneck", **options.model_dump()}, indent=2))

    return atomic_write_dir(dest, write)


def load_adapter(model: torch.nn.Module, path: str | Path, name: str) -> AdapterOptions:
    """Add the adapter saved at ``path`` to ``model`` under ``name`` (slots inserted if needed)."""
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    if config.pop("type", None) != "bottleneck":
        raise ValueError(f"{path}/adapter_config.json is not a bottleneck adapter")
    options = AdapterOptions(**config)
    if not slots(model):
        insert_slots(model, options.target_modules)
    add_adapter(model, name, options)
    tensors = {k.replace(".adapters.ADAPTER.", f".adapters.{name}."): v
               for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
    missing = set(adapter_state(model, name)) - set(tensors)
    if missing:
        raise ValueError(f"{path}: adapter weights missing for {sorted(missing)[0]}")
    model.load_state_dict(tensors, strict=False)
    return options


@register
class AdapterPerTask(Strategy):
    name = "adapter-per-task"
    not_private = "its task router keeps the mean embedding of each task's private inputs, without noise"
    data_parallel = ""  # each task's adapter is initialized from the phase seed on every process
    sharded = "it adds a new adapter at each task's start, after the weights were sharded"
    summary = "Houlsby bottleneck adapters per task (identity at init), base frozen; routed when no task is given"
    not_exportable = "its Houlsby bottleneck adapters are modules of its own, not a PEFT format"
    options_key = "adapter"
    Options = AdapterOptions
    owns_parameters = True
    freezes_earlier = True
    scores_per_task = True
    per_task_phases = True

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.trained: list[str] = []
        self.router: TaskRouter | None = None
        self._per_task = 0

    def setup(self, ctx: Context):
        for p in ctx.model.parameters():
            p.requires_grad = False
        insert_slots(ctx.model, self.options.target_modules)
        self.router = TaskRouter(lambda: self._use(ctx, None))
        return None

    def task_router(self) -> TaskRouter | None:
        return self.router

    def before_task(self, ctx: Context, tasks) -> None:
        name = tasks[0].name
        add_adapter(ctx.model, name, self.options)
        set_active(ctx.model, name)
        for slot in slots(ctx.model):
            for task, module in slot.adapters.items():
                module.requires_grad_(task == name)

    def after_task(self, ctx: Context, tasks) -> None:
        name = tasks[0].name
        self.trained.append(name)
        self._per_task = sum(p.numel() for slot in slots(ctx.model) for p in slot.adapters[name].parameters())
        for slot in slots(ctx.model):
            slot.adapters[name].requires_grad_(False)
        self.router.add_task(ctx, name, [ex.input for ex in tasks[0].train])
        if ctx.run_dir is not None:
            save_adapter(ctx.model, name, self.options, ctx.run_dir / "adapters" / name)

    @contextmanager
    def _use(self, ctx: Context, name: str | None):
        previous = slots(ctx.model)[0].active if slots(ctx.model) else None
        set_active(ctx.model, name)
        try:
            yield
        finally:
            set_active(ctx.model, previous)

    def route(self, ctx: Context, task: str | None):
        if task is None:  # the probe: the latest adapter, the one a deployment would serve last
            return self._use(ctx, self.trained[-1] if self.trained else None)
        return self._use(ctx, task if task in self.trained else None)

    def stats(self) -> dict:
        return {"adapters": len(self.trained), "parameters_per_task": self._per_task}

    def state_dict(self) -> dict:
        return {"trained": list(self.trained), "router": self.router.state() if self.router else {}}

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        self.trained = list(state.get("trained", []))
        for name in self.trained:
            add_adapter(ctx.model, name, self.options)
        if self.router is not None:
            self.router.load(state.get("router", {}))
