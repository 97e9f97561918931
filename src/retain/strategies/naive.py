"""Full fine-tuning, task after task: the forgetting baseline."""

from __future__ import annotations

from retain.strategies.base import Context, Strategy, register


@register
class Naive(Strategy):
    name = "naive"
    not_private = ""
    data_parallel = ""
    sharded = ""
    summary = "full fine-tuning of every weight, task after task (the forgetting baseline)"
    task_free = True
    owns_parameters = True

    def setup(self, ctx: Context):
        ctx.model.requires_grad_(True)
        return None
