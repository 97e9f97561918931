"""Capping a split: a seeded sample, stratified by label, the same items wherever it is drawn.

A capped test set is read in every row of R and by every run that compares with this one,
so the draw depends only on the task's name, the cap and ``eval.sample_seed``, never on
the run's seed. Taking the first N items instead would follow the file's order, and a
file sorted by label would then test a single class.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from retain.streams.task import Example


@dataclass(frozen=True)
class Sample:
    """Which items a capped split kept: recorded in results.json (``eval_samples``)."""

    of: int
    indices: list[int] = field(default_factory=list)
    #: What the sample was stratified by: "label" (a closed label set), "answer position"
    #: (multiple choice with per-item options) or None (no options).
    stratified_by: str | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return {"n": len(self.indices), "of": self.of, "stratified_by": self.stratified_by, "seed": self.seed,
                "indices": self.indices}


def _stratum(examples: list[Example]) -> tuple[str | None, list]:
    if not examples or any(ex.options is None for ex in examples):
        return None, [None] * len(examples)
    if len({ex.options for ex in examples}) == 1:
        return "label", [ex.output for ex in examples]
    return "answer position", [ex.answer_index for ex in examples]


def _quotas(sizes: dict, k: int) -> dict:
    """Proportional allocation of ``k`` over the strata (largest remainders; ties by order)."""
    n = sum(sizes.values())
    exact = {s: k * size / n for s, size in sizes.items()}
    quota = {s: int(v) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: quota[s] - exact[s])[: k - sum(quota.values())]:
        quota[s] += 1
    return quota


def seeded_sample(examples: list[Example], k: int, key: str, seed: int = 0) -> tuple[list[Example], Sample]:
    """At most ``k`` of ``examples``, kept in file order; ``key`` names the split (task/split)."""
    if k >= len(examples):
        return list(examples), Sample(len(examples), list(range(len(examples))), None, seed)
    rng = random.Random(f"{key}/{k}/{seed}")
    kind, strata = _stratum(examples)
    groups: dict = defaultdict(list)
    for i, s in enumerate(strata):
        groups[s].append(i)
    order = list(groups)  # first appearance in the file: deterministic
    quota = _quotas({s: len(groups[s]) for s in order}, k)
    picked = sorted(i for s in order for i in rng.sample(groups[s], quota[s]))
    return [examples[i] for i in picked], Sample(len(examples), picked, kind, seed)
