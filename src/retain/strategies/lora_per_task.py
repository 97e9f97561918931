"""A new LoRA adapter per task: tasks cannot overwrite each other, at the price of routing.

Task j is scored with adapter j; a task not trained yet is scored on the base model.
The probe is scored with the latest adapter, the one a deployment would serve last.
A router (nearest task centroid of base-model embeddings) picks the adapter when the
task is not given: the run's task-agnostic evaluation and ``retain generate`` use it.
"""

from __future__ import annotations

from contextlib import contextmanager

from retain.routing import TaskRouter
from retain.strategies.base import Context, Strategy, register
from retain.strategies._lora import LoraOptions, save_adapter, use_adapter, wrap_with_lora


@register
class LoraPerTask(Strategy):
    name = "lora-per-task"
    not_private = "its task router keeps the mean embedding of each task's private inputs, without noise"
    # Each task's adapter is initialized from the phase seed on every process; the router's
    # centroids are computed on every process alike.
    data_parallel = ""
    sharded = "it adds a new adapter at each task's start, after the weights were sharded"
    summary = "a fresh LoRA adapter for each task, saved under adapters/<task>/; earlier adapters stay bit-identical"
    options_key = "lora"
    Options = LoraOptions
    owns_parameters = True
    freezes_earlier = True
    scores_per_task = True
    per_task_phases = True

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.trained: list[str] = []
        self.router: TaskRouter | None = None

    def setup(self, ctx: Context):
        self.router = TaskRouter(lambda: self._use(ctx, None))
        return wrap_with_lora(ctx.model, self.options, adapter_name=ctx.stream.tasks[0].name)

    def task_router(self) -> TaskRouter | None:
        return self.router

    def _ensure(self, ctx: Context, name: str) -> None:
        if name not in ctx.model.peft_config:
            ctx.model.add_adapter(name, self.options.peft_config())

    def before_task(self, ctx: Context, tasks) -> None:
        name = tasks[0].name
        self._ensure(ctx, name)
        # set_adapter makes this adapter the only trainable one; the others are frozen.
        ctx.model.set_adapter(name)

    def after_task(self, ctx: Context, tasks) -> None:
        self.trained.append(tasks[0].name)
        if self.router is not None:
            self.router.add_task(ctx, tasks[0].name, [ex.input for ex in tasks[0].train])
        if ctx.run_dir is not None:
            save_adapter(ctx.model, tasks[0].name, ctx.run_dir / "adapters" / tasks[0].name)

    @contextmanager
    def _use(self, ctx: Context, name: str | None):
        if name is None:
            with ctx.model.disable_adapter():
                yield
            return
        with use_adapter(ctx.model, name):
            yield

    def route(self, ctx: Context, task: str | None):
        if task is None:
            return self._use(ctx, self.trained[-1]) if self.trained else self._use(ctx, None)
        return self._use(ctx, task if task in self.trained else None)

    def state_dict(self) -> dict:
        return {"trained": list(self.trained), "router": self.router.state() if self.router else {}}

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        self.trained = list(state.get("trained", []))
        if self.router is not None:
            self.router.load(state.get("router", {}))
        for name in self.trained:
            self._ensure(ctx, name)
