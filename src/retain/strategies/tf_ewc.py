"""Task-free consolidation (Aljundi, Kelchtermans and Tuytelaars 2019) with online EWC.

Nobody says when a task ends, so the training loss does (``_plateau``): a plateau of the
step losses is when to consolidate. At each plateau after a shift (and at the first), a
diagonal Fisher is estimated on the ``recent`` examples trained last and folded into one
running Fisher (F <- gamma F + F_new) with the current weights as the anchor; the penalty is
(lambda / 2) sum F (theta - anchor)^2. The shifts are reported (``strategy_stats``, and
``online.shifts`` in online mode) to be compared with the hidden task boundaries.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from retain.streams.task import Item
from retain.strategies._plateau import LossWatch
from retain.strategies._importance import diagonal_fisher, named_trainable
from retain.strategies.base import Context, Strategy, register


class TaskFreeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float = Field(default=100.0, ge=0, alias="lambda", description="penalty strength")
    gamma: float = Field(default=1.0, gt=0, le=1, description="decay of the running Fisher at each consolidation")
    window: int = Field(default=10, ge=2, description="step losses in the detector's window")
    plateau_cv: float = Field(default=0.2, gt=0, description="a plateau: the window's standard deviation "
                              "below this fraction of its mean")
    peak_ratio: float = Field(default=1.5, gt=1, description="a shift: the window's mean above this many times "
                              "the last plateau's")
    recent: int = Field(default=32, ge=1, description="examples trained last, kept for the Fisher estimate")
    fisher_samples: int = Field(default=16, ge=1, description="of those, examples per Fisher estimate")


@register
class TaskFreeEWC(Strategy):
    name = "tf-ewc"
    not_private = ("its Fisher information is estimated from private examples outside the noised step, and its penalty "
                   "is not a per-example loss, so DP-SGD would drop its gradient")
    data_parallel = "it detects loss plateaus in online mode, which runs in one process"
    sharded = "it runs in online mode, which runs in one process"
    summary = "task-free consolidation: online EWC at loss plateaus, shifts detected from loss peaks"
    options_key = "tf_ewc"
    Options = TaskFreeOptions
    task_free = True
    acts_on_earlier = True
    anchors_weights = True

    def __init__(self, options: TaskFreeOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        self.watch = LossWatch(o.window, o.plateau_cv, o.peak_ratio)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.recent: deque[Item] = deque(maxlen=o.recent)
        self.plateaus: list[int] = []
        self.shifts: list[int] = []

    def batches(self, ctx: Context, tasks, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        return self.watch.watched(batches, lambda events: self.observe(ctx, events), self.recent.extend)

    def observe(self, ctx: Context, events: list[tuple[int, str]]) -> None:
        """Record shifts; consolidate at a plateau."""
        for step, event in events:
            if event == "shift":
                self.shifts.append(step)
            else:
                self.plateaus.append(step)
                self.consolidate(ctx, step)

    def consolidate(self, ctx: Context, step: int) -> None:
        params = named_trainable(ctx.model)
        fisher = diagonal_fisher(ctx.model, ctx.tokenizer, list(self.recent), params, self.options.fisher_samples,
                                 ctx.config.train.max_length, seed=ctx.config.seed * 1000 + step)
        self.fisher = {k: self.options.gamma * self.fisher[k] + v if k in self.fisher else v
                       for k, v in fisher.items()}
        self.anchor = {k: p.detach().clone() for k, p in params.items()}

    def extra_loss(self, ctx: Context, batch, outputs, items):
        self.watch.record(outputs)
        if not self.fisher or self.options.lambda_ == 0:
            return None
        total = None
        for name, p in named_trainable(ctx.model).items():
            if name in self.fisher:
                term = (self.fisher[name] * (p - self.anchor[name]) ** 2).sum()
                total = term if total is None else total + term
        return None if total is None else 0.5 * self.options.lambda_ * total

    def after_task(self, ctx: Context, tasks) -> None:
        self.observe(ctx, self.watch.drain())

    def stats(self) -> dict:
        return {"consolidations": len(self.plateaus), "plateaus_at_step": list(self.plateaus),
                "shifts_at_step": list(self.shifts)}

    # -- checkpoints: JSON state, tensors beside it ----------------------------------------
    def _json(self) -> dict:
        return {**self.watch.state(), "recent": [[i.task, i.prompt, i.target] for i in self.recent],
                "plateaus": list(self.plateaus), "shifts": list(self.shifts)}

    def _load_json(self, state: dict) -> None:
        self.watch.load(state)
        self.recent = deque((Item(*r) for r in state["recent"]), maxlen=self.options.recent)
        self.plateaus, self.shifts = list(state["plateaus"]), list(state["shifts"])

    def state_dict(self) -> dict:
        return self._json()

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        if state:
            self._load_json(state)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"fisher/{k}": v for k, v in self.fisher.items()},
                **{f"anchor/{k}": v for k, v in self.anchor.items()}}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fisher = {k[len("fisher/"):]: v for k, v in tensors.items() if k.startswith("fisher/")}
        self.anchor = {k[len("anchor/"):]: v for k, v in tensors.items() if k.startswith("anchor/")}

    def phase_state(self) -> dict:
        # Replaying the batch draws after a kill does not rerun the losses: the detector, the
        # Fisher and the anchor as they were at the step are saved (tensors beside the JSON).
        return {**self._json(), "fisher": dict(self.fisher), "anchor": dict(self.anchor)}

    def load_phase_state(self, ctx: Context, state: dict) -> None:
        self._load_json(state)
        self.fisher, self.anchor = dict(state["fisher"]), dict(state["anchor"])
