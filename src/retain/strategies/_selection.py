"""Which examples a bounded replay memory keeps: orderings of a task's candidates, best first.

Each function returns indices in priority order, so a memory that must shrink later (a
new task takes its share of the budget) keeps a prefix and the prefix is still that
policy's answer for the smaller size.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch


def k_center_greedy(points: torch.Tensor, k: int) -> list[int]:
    """Greedy k-center: start at the point nearest the mean, then repeatedly take the point
    farthest from every point taken so far (a 2-approximation of the k-center cover).

    Written by hand: a few lines of tensor code, where a clustering library would add a
    dependency and not give the nested (prefix) order this memory needs.
    """
    n = points.shape[0]
    if n == 0 or k <= 0:
        return []
    points = points.float()
    first = int(torch.cdist(points.mean(0, keepdim=True), points)[0].argmin())
    chosen = [first]
    dist = torch.cdist(points[first:first + 1], points)[0]
    while len(chosen) < min(k, n):
        nxt = int(dist.argmax())  # the first index on ties
        if float(dist[nxt]) == 0.0:
            break  # only duplicates of chosen points remain
        chosen.append(nxt)
        dist = torch.minimum(dist, torch.cdist(points[nxt:nxt + 1], points)[0])
    return chosen


def highest_first(scores: Sequence[float]) -> list[int]:
    """Indices by descending score (the highest-loss, most surprising examples first); stable."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def shuffled(n: int, seed: str) -> list[int]:
    """A seeded random order: every prefix is a uniform random subset."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order
