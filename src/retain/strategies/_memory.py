"""Memories of earlier tasks' examples shared by the replay strategies (replay,
distill-replay, mix, generative-replay): a reservoir, the mixing of memory into batches,
and random-generator states that go through JSON."""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator

from retain.streams.task import Item


def rng_state(rng: random.Random) -> list:
    """A ``random.Random``'s state as JSON (checkpoints are JSON)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


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
        return {"seen": self.seen, "rng": rng_state(self.rng), "records": [encode(r) for r in self.records]}

    def load(self, state: dict, decode: Callable[[Any], Any]) -> None:
        self.seen = state["seen"]
        set_rng_state(self.rng, state["rng"])
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
