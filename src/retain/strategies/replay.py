"""Experience replay: a reservoir-sampled memory of past examples mixed into every batch."""

from __future__ import annotations

import random
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field

from retain.streams.task import Item
from retain.strategies.base import Context, Strategy, register


class ReplayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    buffer_size: int = Field(default=200, ge=1, description="examples kept in memory across all past tasks")
    ratio: float = Field(default=0.25, gt=0, lt=1, description="fraction of each batch drawn from memory")


@register
class Replay(Strategy):
    name = "replay"
    summary = "reservoir-sampled memory of past examples; a fraction `ratio` of each batch is replayed"
    options_key = "replay"
    Options = ReplayOptions

    def __init__(self, options: ReplayOptions | None = None) -> None:
        super().__init__(options or ReplayOptions())
        self.buffer: list[Item] = []
        self.seen = 0
        self.rng = random.Random(0)
        self._current: list[Item] = []

    def setup(self, ctx: Context):
        self.rng = random.Random(f"replay/{ctx.config.seed}")
        return None

    def add(self, item: Item) -> None:
        """Reservoir sampling: every example seen so far is in memory with equal probability."""
        self.seen += 1
        if len(self.buffer) < self.options.buffer_size:
            self.buffer.append(item)
            return
        j = self.rng.randrange(self.seen)
        if j < self.options.buffer_size:
            self.buffer[j] = item

    def batches(self, ctx: Context, tasks, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        self._current = []
        for batch in batches:
            k = round(self.options.ratio * len(batch)) if self.buffer else 0
            fresh = batch[: len(batch) - k]
            self._current.extend(fresh)
            yield fresh + [self.rng.choice(self.buffer) for _ in range(k)]

    def after_task(self, ctx: Context, tasks) -> None:
        for item in self._current:
            self.add(item)
        self._current = []

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "seen": self.seen,
            "rng": [version, list(internal), gauss],
            "buffer": [[i.task, i.prompt, i.target] for i in self.buffer],
        }

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        if not state:
            return
        self.seen = state["seen"]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.buffer = [Item(*row) for row in state["buffer"]]
