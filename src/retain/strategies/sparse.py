"""Sparse updates: on each task only the top-k% most important weights may change.

Importance is measured on the new task's data before it trains (diagonal Fisher, or the
accumulated gradient magnitude); the gradient of every other entry is zeroed by a hook,
so AdamW (with weight decay 0) leaves those entries bit-identical. The fraction of
entries that actually changed is recorded in results.json (``strategy_stats``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from retain.strategies._importance import diagonal_fisher, gradient_magnitude, named_trainable
from retain.strategies.base import Context, Strategy, register


class SparseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    percent: float = Field(default=5.0, gt=0, le=100, description="percentage of trainable entries updated per task")
    importance: Literal["gradient", "fisher"] = "gradient"
    importance_samples: int = Field(default=64, ge=1, description="examples used to score importance")


def top_percent_masks(scores: dict[str, torch.Tensor], percent: float) -> dict[str, torch.Tensor]:
    """Boolean masks selecting the globally highest-scoring ``percent`` of entries."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = max(1, int(round(flat.numel() * percent / 100)))
    threshold = flat.topk(k).values[-1]
    masks = {n: s >= threshold for n, s in scores.items()}
    # Ties at the threshold may select a few more than k; drop the excess deterministically.
    excess = sum(int(m.sum()) for m in masks.values()) - k
    for n in masks:
        if excess <= 0:
            break
        ties = ((scores[n] == threshold) & masks[n]).flatten().nonzero().squeeze(-1)
        drop = ties[:excess]
        masks[n].view(-1)[drop] = False
        excess -= len(drop)
    return masks


@register
class Sparse(Strategy):
    name = "sparse"
    not_private = "its gradient masks rank weights by importance measured on private examples outside the noised step"
    # Importance is measured on every process alike; the masks act on each process's gradients
    # before they are summed.
    data_parallel = ""
    sharded = "its gradient masks select entries of whole weights"
    summary = "only the top-k% most important weights (gradient magnitude or Fisher) update on each task"
    options_key = "sparse"
    Options = SparseOptions
    anchors_weights = True
    needs_loop_optimizer = True

    def __init__(self, options: SparseOptions | None = None) -> None:
        super().__init__(options)
        self._hooks: list = []
        self._before: dict[str, torch.Tensor] = {}
        self._stats: dict = {}

    def check(self, config, stream) -> None:
        if config.train.weight_decay:
            raise ValueError("sparse needs train.weight_decay: 0 (decay would move the frozen entries)")

    def before_task(self, ctx: Context, tasks) -> None:
        params = named_trainable(ctx.model)
        items = [it for t in tasks for it in t.items(ctx.tokenizer)]
        cfg, seed = ctx.config.train, ctx.phase_seed
        if self.options.importance == "fisher":
            scores = diagonal_fisher(ctx.model, ctx.tokenizer, items, params, self.options.importance_samples,
                                     cfg.max_length, seed)
        else:
            scores = gradient_magnitude(ctx.model, ctx.tokenizer, items, params, self.options.importance_samples,
                                        cfg.batch_size, cfg.max_length, seed)
        masks = top_percent_masks(scores, self.options.percent)
        self._before = {n: p.detach().clone() for n, p in params.items()}
        for name, p in params.items():
            mask = masks[name].to(p.dtype)
            self._hooks.append(p.register_hook(lambda g, m=mask: g * m))

    def after_task(self, ctx: Context, tasks) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        params = named_trainable(ctx.model)
        changed = sum(int((params[n].detach() != before).sum()) for n, before in self._before.items())
        total = sum(b.numel() for b in self._before.values())
        self._stats = {"changed_fraction": changed / total, "allowed_fraction": self.options.percent / 100}
        self._before = {}

    def stats(self) -> dict:
        return self._stats
