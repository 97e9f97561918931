"""Merge the per-task LoRA adapters of a run into one and score the merged model.

``lora-per-task+merge``: after the last task, each method in ``merge.methods`` combines
the task adapters through PEFT's ``add_weighted_adapter`` (``linear`` averages the A and
B matrices, a cheap approximation; ``cat`` is the exact weighted sum of the updates at
the sum of the ranks; ``ties`` trims each update to ``density``, elects a sign per entry
and averages the agreeing ones), scores every task and the probe with the merged adapter
alone -- one adapter, no routing -- and saves it to ``adapters/merged-<method>/``.
results.json -> ``final`` -> ``merge`` holds the scores next to the per-task ones.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from retain.strategies._lora import TRIMMING, Method, merge_adapters, save_adapter, use_adapter
from retain.strategies.base import Context, Evaluate, Strategy, register

__all__ = ["Merge", "MergeOptions", "merge_adapters", "use_adapter"]

class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    methods: list[Method] = Field(default_factory=lambda: ["linear", "ties"], min_length=1)
    weights: list[float] | None = Field(default=None, description="one per task, in stream order "
                                        "(default 1/T, or 1 for the trimming methods)")
    density: float = Field(default=0.5, gt=0, le=1, description="fraction of each update kept (ties, dare, "
                           "magnitude_prune)")


@register
class Merge(Strategy):
    name = "merge"
    not_private = "it merges lora-per-task's adapters, whose task router keeps un-noised statistics of private inputs"
    data_parallel = ""  # its merged adapters are built and scored on every process alike (scoring split)
    sharded = "it merges per-task adapters, which a sharded run cannot add"
    summary = "after the stream, merge the per-task LoRA adapters into one (linear, TIES, ...) and score it"
    options_key = "merge"
    Options = MergeOptions
    requires = frozenset({"lora-per-task"})

    def check(self, config, stream) -> None:
        n = len(stream.tasks)
        if self.options.weights is not None and len(self.options.weights) != n:
            raise ValueError(f"merge.weights has {len(self.options.weights)} values; the stream has {n} tasks "
                             f"({', '.join(stream.task_names)})")

    def finish(self, ctx: Context, evaluate: Evaluate) -> dict:
        model = ctx.accelerator.unwrap_model(ctx.model)
        adapters = [t for t in ctx.stream.task_names if t in model.peft_config]
        out = {"adapters": adapters, "methods": {}}
        for method in self.options.methods:
            weights = self.options.weights or [1.0 if method in TRIMMING else 1.0 / len(adapters)] * len(adapters)
            name = f"merged-{method}"
            merge_adapters(model, adapters, weights, method, name, self.options.density)
            scores, probe = evaluate(lambda task, name=name: use_adapter(model, name), f"merged ({method})")
            out["methods"][method] = {
                "weights": weights,
                "scores": dict(zip(ctx.stream.task_names, scores)),
                "AA": round(sum(scores) / len(scores), 4),
                "probe": probe,
            }
            if ctx.run_dir is not None:
                save_adapter(model, name, ctx.run_dir / "adapters" / name)
        return out
