"""Learning without Forgetting: distil the model as it was before the task into the model
being trained, on the current task's inputs: alpha * T^2 * KL(p_old || p_new) at temperature T.

The teacher is not a second model: it is the trainable weights as they were when the
task began, swapped in for one no-grad forward pass per step. Under LoRA that is only
the adapter's previous state (base weights are shared), so no second copy of the base
model is held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from retain.strategies.base import Context, Strategy, register


class LwFOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(default=1.0, ge=0, description="weight of the distillation term")
    temperature: float = Field(default=2.0, gt=0, le=100)


def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, float]:
    """Sum over masked positions of T^2 * KL(softmax(t/T) || softmax(s/T)), and the positions'
    count (their mean is the term; a data-parallel run divides by the global count)."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return temperature**2 * (kl * mask).sum(), float(mask.sum())


@register
class LwF(Strategy):
    name = "lwf"
    not_private = "its distillation term is added to the batch's loss outside retain's per-example loss"
    data_parallel = ""  # its KL is summed over each share and divided by the global count of positions
    sharded = "it snapshots the whole model as a teacher at each task's start, a copy outside the sharded model"
    summary = "Learning without Forgetting: KL to the pre-task model on the new task's inputs (no second model copy)"
    options_key = "lwf"
    Options = LwFOptions
    acts_on_earlier = True
    distils_previous_model = True
    reads_logits = True

    def __init__(self, options: LwFOptions | None = None) -> None:
        super().__init__(options)
        self.params: list[torch.nn.Parameter] = []
        self.snapshot: list[torch.Tensor] = []

    def before_task(self, ctx: Context, tasks) -> None:
        self.params = [p for p in ctx.model.parameters() if p.requires_grad]
        # No teacher for the first task: there is nothing earlier to keep.
        self.snapshot = [p.detach().clone() for p in self.params] if ctx.phase > 0 else []

    def _swap(self) -> None:
        for p, s in zip(self.params, self.snapshot):
            p.data, s.data = s.data, p.data

    @torch.no_grad()
    def teacher_logits(self, model, batch) -> torch.Tensor:
        self._swap()
        try:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            self._swap()

    def extra_loss(self, ctx: Context, batch, outputs, items):
        if not self.snapshot or self.options.alpha == 0:
            return None
        teacher = self.teacher_logits(ctx.model, batch)
        mask = batch["attention_mask"].float()
        total, count = distillation_kl(teacher, outputs.logits, mask, self.options.temperature)
        return self.options.alpha * ctx.processes.mean(total, count)

    def after_task(self, ctx: Context, tasks) -> None:
        self.snapshot, self.params = [], []
