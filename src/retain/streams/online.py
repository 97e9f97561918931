"""Online streams: every task's training examples as one ordered pass with hidden boundaries.

``sharp`` keeps the tasks in order (each task's examples shuffled with the run's seed); the
strategies are not told where one task ends. ``blurry`` gives each example a position
``t + (rank + 0.5) / n_t`` in task lengths plus Gaussian noise of standard deviation
``blur`` and sorts by it, so examples of neighbouring tasks mix near each boundary and
nowhere else (a Gaussian task schedule, as in the blurry and task-free setups). The hidden
boundaries are where the examples of the tasks before would end: the cumulative sizes.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

from retain.streams.task import Item


def schedule(sizes: list[int], boundaries: str = "sharp", blur: float = 0.1, seed: int = 0) -> list[tuple[int, int]]:
    """(task index, example index) in the order the stream presents them; each example once."""
    rng = random.Random(f"online/{seed}")
    keyed = []
    for t, n in enumerate(sizes):
        order = list(range(n))
        rng.shuffle(order)
        for rank, i in enumerate(order):
            position = t + (rank + 0.5) / n
            if boundaries == "blurry" and blur > 0:
                position += rng.gauss(0.0, blur)
            keyed.append((position, t, i))
    keyed.sort(key=lambda k: k[0])
    return [(t, i) for _, t, i in keyed]


def hidden_boundaries(sizes: list[int]) -> list[int]:
    """Examples seen when each task's share of the stream ends (the last one is the stream's end)."""
    out, total = [], 0
    for n in sizes:
        total += n
        out.append(total)
    return out


def online_batches(order: list[tuple[int, int]], items: list[list[Item]], batch_size: int, passes: int,
                   label: str | None) -> Iterator[list[Item]]:
    """Consecutive batches of the scheduled items, each yielded ``passes`` times; ``label``
    replaces every item's task name (None: the task stays visible)."""
    for start in range(0, len(order), batch_size):
        batch = [items[t][i] for t, i in order[start:start + batch_size]]
        if label is not None:
            batch = [Item(label, it.prompt, it.target, it.lm_loss) for it in batch]
        for _ in range(passes):
            yield batch


def steps_for(examples: int, batch_size: int, passes: int) -> int:
    return math.ceil(examples / batch_size) * passes
