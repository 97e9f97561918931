"""Experience replay: a reservoir-sampled memory of past examples mixed into every batch."""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from retain.streams.task import Item
from retain.strategies.base import Context, Strategy, register


class ReplayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    buffer_size: int = Field(default=200, ge=1, description="examples kept in memory across all past tasks")
    ratio: float = Field(default=0.25, gt=0, lt=1, description="fraction of each batch drawn from memory")


class Reservoir:
    """Reservoir sampling: every record offered so far is kept with equal probability."""

    def __init__(self, size: int, seed: str = "replay/0") -> None:
        self.size = size
        self.records: list[Any] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def offer(self, record: Any) -> Any | None:
        """Offer a record; returns the record that left memory (or was refused), if any."""
        self.seen += 1
        if len(self.records) < self.size:
            self.records.append(record)
            return None
        j = self.rng.randrange(self.seen)
        if j < self.size:
            evicted, self.records[j] = self.records[j], record
            return evicted
        return record

    def state(self, encode: Callable[[Any], Any]) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"seen": self.seen, "rng": [version, list(internal), gauss], "records": [encode(r) for r in self.records]}

    def load(self, state: dict, decode: Callable[[Any], Any]) -> None:
        self.seen = state["seen"]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.records = [decode(r) for r in state["records"]]


def mix_batches(batches: Iterator[list[Item]], draw: Callable[[int], list[Item]], ratio: float,
                fresh: list[Item]) -> Iterator[list[Item]]:
    """Replace a fraction ``ratio`` of each batch with ``draw(k)``; record the fresh items kept."""
    for batch in batches:
        k = round(ratio * len(batch))
        extra = draw(k) if k else []
        kept = batch[: len(batch) - len(extra)]
        fresh.extend(kept)
        yield kept + extra


@register
class Replay(Strategy):
    name = "replay"
    summary = "reservoir-sampled memory of past examples; a fraction `ratio` of each batch is replayed"
    options_key = "replay"
    Options = ReplayOptions

    def __init__(self, options: ReplayOptions | None = None) -> None:
        super().__init__(options)
        self.memory = Reservoir(self.options.buffer_size)
        self._current: list[Item] = []

    @property
    def buffer(self) -> list[Item]:
        return self.memory.records

    def setup(self, ctx: Context):
        self.memory = Reservoir(self.options.buffer_size, f"replay/{ctx.config.seed}")
        return None

    def add(self, item: Item) -> None:
        self.memory.offer(item)

    def _draw(self, k: int) -> list[Item]:
        if not self.buffer:
            return []
        return [self.memory.rng.choice(self.buffer) for _ in range(k)]

    def batches(self, ctx: Context, tasks, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        self._current = []
        return mix_batches(batches, self._draw, self.options.ratio, self._current)

    def after_task(self, ctx: Context, tasks) -> None:
        for item in self._current:
            self.add(item)
        self._current = []

    def state_dict(self) -> dict:
        return self.memory.state(lambda i: [i.task, i.prompt, i.target])

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        if state:
            self.memory.load(state, lambda row: Item(*row))
