"""Where a stream without boundaries shifts, read from the training loss (task-free methods).

A window of recent step losses that has settled (its spread below ``plateau_cv`` of its mean)
is a plateau: the model has learned what the stream currently shows. A window whose mean rises
above ``peak_ratio`` times the last plateau's is a shift: new data arriving. ``tf-ewc``
consolidates at plateaus, ``tf-lora`` opens a new adapter at shifts.

Written by hand: no library of the field implements loss-plateau detection for LLM training.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any, Callable, Iterator

from retain.streams.task import Item


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


class LossWatch:
    """Step losses fed to a ``PlateauDetector``. A step's loss is known only after the step,
    so the losses are collected (``record``, from ``extra_loss``) and read when the next batch
    is drawn (``watched``) or the phase ends (``drain``)."""

    def __init__(self, window: int, plateau_cv: float, peak_ratio: float) -> None:
        self.detector = PlateauDetector(window, plateau_cv, peak_ratio)
        self.pending: list[float] = []
        self.steps = 0

    def record(self, outputs: Any) -> None:
        if getattr(outputs, "loss", None) is not None:
            self.pending.append(float(outputs.loss.detach()))

    def drain(self) -> list[tuple[int, str]]:
        """The (step, event) pairs of the losses collected since the last call."""
        events = []
        for loss in self.pending:
            self.steps += 1
            events += [(self.steps, event) for event in self.detector.update(loss)]
        self.pending = []
        return events

    def watched(self, batches: Iterator[list[Item]], on_events: Callable[[list[tuple[int, str]]], None],
                on_new: Callable[[list[Item]], None]) -> Iterator[list[Item]]:
        """``batches`` unchanged; before each, the events so far go to ``on_events``, and a batch
        not seen before (online passes repeat a batch) to ``on_new``."""
        last = None
        for batch in batches:
            on_events(self.drain())
            if batch is not last:
                on_new(batch)
            last = batch
            yield batch

    def state(self) -> dict:
        return {"detector": self.detector.state(), "pending": list(self.pending), "steps": self.steps}

    def load(self, state: dict) -> None:
        self.detector.load(state["detector"])
        self.pending, self.steps = list(state["pending"]), state["steps"]
