"""Task-free consolidation (Aljundi, Kelchtermans and Tuytelaars 2019) with online EWC.

Nobody says when a task ends, so the training loss does: a window of recent step losses
that has settled (its spread below ``plateau_cv`` of its mean) is a plateau, the model has
learned what the stream currently shows, and that is when to consolidate; a window whose
mean rises above ``peak_ratio`` times the last plateau's is a shift, new data arriving.
At each plateau after a shift (and at the first), a diagonal Fisher is estimated on the
``recent`` examples trained last and folded into one running Fisher (F <- gamma F + F_new)
with the current weights as the anchor; the penalty is (lambda / 2) sum F (theta - anchor)^2.
The shifts are reported (``strategy_stats``, and ``online.shifts`` in online mode) to be
compared with the hidden task boundaries.

Written by hand: no library of the field implements loss-plateau detection for LLM training.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from retain.streams.task import Item
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


class PlateauDetector:
    """Plateaus and peaks in a sequence of losses; ``update`` returns the events of one loss."""

    def __init__(self, window: int, plateau_cv: float, peak_ratio: float) -> None:
        self.window, self.plateau_cv, self.peak_ratio = window, plateau_cv, peak_ratio
        self.losses: deque[float] = deque(maxlen=window)
        self.plateau_mean: float | None = None
        self.armed = True  # the next plateau consolidates (the first does; after it, only after a shift)
        self.count = 0

    def update(self, loss: float) -> list[str]:
        self.count += 1
        self.losses.append(loss)
        if len(self.losses) < self.window:
            return []
        mean = statistics.fmean(self.losses)
        if not self.armed and self.plateau_mean is not None and mean > self.peak_ratio * self.plateau_mean:
            self.armed = True
            return ["shift"]
        if self.armed and statistics.pstdev(self.losses) < self.plateau_cv * mean:
            self.armed, self.plateau_mean = False, mean
            return ["plateau"]
        return []

    def state(self) -> dict:
        return {"losses": list(self.losses), "plateau_mean": self.plateau_mean, "armed": self.armed,
                "count": self.count}

    def load(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.window)
        self.plateau_mean, self.armed, self.count = state["plateau_mean"], state["armed"], state["count"]


@register
class TaskFreeEWC(Strategy):
    name = "tf-ewc"
    not_private = ("its Fisher information is estimated from private examples outside the noised step, and its penalty "
                   "is not a per-example loss, so DP-SGD would drop its gradient")
    summary = "task-free consolidation: online EWC at loss plateaus, shifts detected from loss peaks"
    options_key = "tf_ewc"
    Options = TaskFreeOptions
    task_free = True
    acts_on_earlier = True
    anchors_weights = True

    def __init__(self, options: TaskFreeOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        self.detector = PlateauDetector(o.window, o.plateau_cv, o.peak_ratio)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.recent: deque[Item] = deque(maxlen=o.recent)
        self.pending: list[float] = []  # losses of steps done, read by the detector before the next batch
        self.plateaus: list[int] = []
        self.shifts: list[int] = []
        self.steps = 0

    def batches(self, ctx: Context, tasks, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        last = None
        for batch in batches:
            self.observe(ctx)
            if batch is not last:
                self.recent.extend(batch)
            last = batch
            yield batch

    def observe(self, ctx: Context) -> None:
        """Feed the losses of the steps done to the detector; consolidate at a plateau."""
        for loss in self.pending:
            self.steps += 1
            for event in self.detector.update(loss):
                if event == "shift":
                    self.shifts.append(self.steps)
                else:
                    self.plateaus.append(self.steps)
                    self.consolidate(ctx)
        self.pending = []

    def consolidate(self, ctx: Context) -> None:
        params = named_trainable(ctx.model)
        fisher = diagonal_fisher(ctx.model, ctx.tokenizer, list(self.recent), params, self.options.fisher_samples,
                                 ctx.config.train.max_length, seed=ctx.config.seed * 1000 + self.steps)
        self.fisher = {k: self.options.gamma * self.fisher[k] + v if k in self.fisher else v
                       for k, v in fisher.items()}
        self.anchor = {k: p.detach().clone() for k, p in params.items()}

    def extra_loss(self, ctx: Context, batch, outputs, items):
        if getattr(outputs, "loss", None) is not None:
            self.pending.append(float(outputs.loss.detach()))
        if not self.fisher or self.options.lambda_ == 0:
            return None
        total = None
        for name, p in named_trainable(ctx.model).items():
            if name in self.fisher:
                term = (self.fisher[name] * (p - self.anchor[name]) ** 2).sum()
                total = term if total is None else total + term
        return None if total is None else 0.5 * self.options.lambda_ * total

    def after_task(self, ctx: Context, tasks) -> None:
        self.observe(ctx)

    def stats(self) -> dict:
        return {"consolidations": len(self.plateaus), "plateaus_at_step": list(self.plateaus),
                "shifts_at_step": list(self.shifts)}

    # -- checkpoints: JSON state, tensors beside it ----------------------------------------
    def _json(self) -> dict:
        return {"detector": self.detector.state(), "recent": [[i.task, i.prompt, i.target] for i in self.recent],
                "pending": list(self.pending), "plateaus": list(self.plateaus), "shifts": list(self.shifts),
                "steps": self.steps}

    def _load_json(self, state: dict) -> None:
        self.detector.load(state["detector"])
        self.recent = deque((Item(*r) for r in state["recent"]), maxlen=self.options.recent)
        self.pending, self.plateaus = list(state["pending"]), list(state["plateaus"])
        self.shifts = list(state["shifts"])
        self.steps = state["steps"]

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
