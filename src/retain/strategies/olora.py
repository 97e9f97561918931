"""O-LoRA: a new LoRA per task, trained orthogonal to the subspaces of earlier tasks' LoRAs.

Every task gets its own adapter; earlier adapters stay active and frozen, so the model
always computes W0 + sum_i B_i A_i and needs no task identity at inference. While task t
trains, the loss adds ``lambda_orth * sum_layers sum_{i<t} ||A_i A_t^T||_F^2``: the rows of
A span the input subspace an adapter reads, and the penalty pushes the new adapter to
read directions the old ones do not, so its update interferes less with theirs. Written
on PEFT's multi-adapter LoRA layers; PEFT has no orthogonality term of its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from retain.strategies.base import Context, Strategy, register
from retain.strategies._lora import LoraOptions, merge_adapters, save_adapter, wrap_with_lora


class OLoraOptions(LoraOptions):
    lambda_orth: float = Field(default=0.5, ge=0, description="weight of the orthogonality penalty")
    lambda_l2: float = Field(default=0.0, ge=0, description="weight of an L2 penalty on the new adapter")


def lora_layers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)]


def orthogonality_penalty(previous: list[torch.Tensor], current: torch.Tensor) -> torch.Tensor:
    """sum_i ||A_i A_t^T||_F^2 for one layer: 0 exactly when every row of ``current`` is
    orthogonal to every row of each earlier A_i."""
    terms = [(p.to(current.dtype) @ current.T).pow(2).sum() for p in previous]
    return torch.stack(terms).sum() if terms else current.new_zeros(())


@register
class OLora(Strategy):
    name = "olora"
    not_private = "its orthogonality penalty acts on the weights, not per example, so DP-SGD would drop its gradient"
    data_parallel = ""  # a penalty on the weights: 1/N of it on each process
    sharded = "it adds a new adapter at each task's start, after the weights were sharded"
    summary = "a LoRA per task kept orthogonal to earlier tasks' LoRAs; all adapters stay active (no routing)"
    options_key = "olora"
    Options = OLoraOptions
    owns_parameters = True
    freezes_earlier = True
    per_task_phases = True

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.trained: list[str] = []
        self.current: str | None = None
        self._overlap: float | None = None

    def setup(self, ctx: Context):
        return wrap_with_lora(ctx.model, self.options, adapter_name=ctx.stream.tasks[0].name)

    def _activate(self, ctx: Context, names: list[str], train: str | None) -> None:
        model = ctx.model
        for name in names:
            if name not in model.peft_config:
                model.add_adapter(name, self.options.peft_config())
        model.base_model.set_adapter(names)
        # set_adapter makes every active adapter trainable: only the current task's may be.
        trainable = {id(p) for layer in lora_layers(model) for part in (layer.lora_A, layer.lora_B)
                     if train in part for p in part[train].parameters()}
        for p in model.parameters():
            p.requires_grad = id(p) in trainable

    def before_task(self, ctx: Context, tasks) -> None:
        self.current = tasks[0].name
        self._activate(ctx, self.trained + [self.current], self.current)

    def extra_loss(self, ctx: Context, batch, outputs, items):
        o, cur = self.options, self.current
        if cur is None or (not self.trained and not o.lambda_l2):
            return None
        total = None
        for layer in lora_layers(ctx.model):
            if cur not in layer.lora_A:
                continue
            a = layer.lora_A[cur].weight
            term = o.lambda_orth * orthogonality_penalty([layer.lora_A[t].weight.detach() for t in self.trained
                                                          if t in layer.lora_A], a)
            if o.lambda_l2:
                term = term + o.lambda_l2 * (a.pow(2).sum() + layer.lora_B[cur].weight.pow(2).sum())
            total = term if total is None else total + term
        return None if total is None else ctx.processes.replicated(total)

    @torch.no_grad()
    def overlap(self, ctx: Context, name: str) -> float:
        """Mean over layers of sum_{earlier i} ||A_i A_name^T||_F^2 (0: fully orthogonal)."""
        earlier = [t for t in self.trained if t != name]
        vals = [float(orthogonality_penalty([layer.lora_A[t].weight for t in earlier], layer.lora_A[name].weight))
                for layer in lora_layers(ctx.model) if name in layer.lora_A]
        return sum(vals) / len(vals) if vals else 0.0

    def after_task(self, ctx: Context, tasks) -> None:
        name = tasks[0].name
        self._overlap = self.overlap(ctx, name) if self.trained else None
        self.trained.append(name)
        self._activate(ctx, list(self.trained), None)
        if ctx.run_dir is not None:
            save_adapter(ctx.model, name, ctx.run_dir / "adapters" / name)

    def stats(self) -> dict:
        return {"adapters": len(self.trained), **({"overlap": self._overlap} if self._overlap is not None else {})}

    def export(self, ctx: Context, run_dir: Path) -> None:
        # The sum of all task adapters as one PEFT adapter (``cat`` with weight 1 is exact):
        # what a server loads to reproduce the evaluated model.
        if len(self.trained) > 1:
            merge_adapters(ctx.model, list(self.trained), [1.0] * len(self.trained), "cat", "olora-sum")
            save_adapter(ctx.model, "olora-sum", run_dir / "adapters" / "olora-sum")
            self._activate(ctx, list(self.trained), None)

    def state_dict(self) -> dict:
        return {"trained": list(self.trained)}

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        self.trained = list(state.get("trained", []))
        if self.trained:
            self._activate(ctx, list(self.trained), None)
