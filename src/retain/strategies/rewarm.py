"""Learning-rate re-warming for continual pre-training: at every stage the rate climbs
linearly to a peak, then follows a cosine down to ``min_lr_ratio`` x peak (as in
"Continual Pre-Training of Large Language Models: How to (re)warm your model?")."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field
from torch.optim.lr_scheduler import LambdaLR

from retain.strategies.base import Context, Strategy, register


class RewarmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1, description="share of each stage spent warming up")
    peak_lr: float | None = Field(default=None, gt=0, description="peak rate (default: train.lr)")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="final rate as a fraction of the peak")


def rewarm_factor(step: int, steps: int, warmup_fraction: float, min_ratio: float) -> float:
    """Multiplier of the peak rate at ``step`` (0-based) of a stage of ``steps`` steps."""
    warmup = int(round(warmup_fraction * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@register
class Rewarm(Strategy):
    name = "rewarm"
    not_private = ""
    data_parallel = ""  # a learning-rate schedule: the same on every process
    sharded = ""  # a learning-rate schedule
    summary = "re-warmed learning rate at each stage: linear warm-up to a peak, cosine decay (continual pre-training)"
    options_key = "rewarm"
    Options = RewarmOptions

    def schedule(self, ctx: Context, optimizer, steps: int):
        o = self.options
        peak = o.peak_lr or ctx.config.train.lr
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = peak
        return LambdaLR(optimizer, lambda step: rewarm_factor(step, steps, o.warmup_fraction, o.min_lr_ratio))
