"""Continual-learning metrics: pure functions of the accuracy matrix.

``R[i][j]`` is the score on task j after training on tasks 0..i; ``b[j]`` the base
model's score on task j. With T tasks (definitions of the project's guide):

    AA  = 1/T     * sum_i        R[T-1][i]
    BWT = 1/(T-1) * sum_{i<T-1}  R[T-1][i] - R[i][i]
    FWT = 1/(T-1) * sum_{i>=1}   R[i-1][i] - b[i]
    FM  = 1/(T-1) * sum_{i<T-1}  max_{j<T-1} (R[j][i] - R[T-1][i])
"""

from __future__ import annotations

from typing import Sequence

Matrix = Sequence[Sequence[float]]


def _square(R: Matrix) -> int:
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"R must be a square T x T matrix, got {T} rows of lengths {[len(r) for r in R]}")
    return T


def average_accuracy(R: Matrix) -> float:
    """Mean of the last row: the score on every task after the whole stream."""
    last = R[-1]
    return sum(last) / len(last)


def backward_transfer(R: Matrix) -> float | None:
    T = _square(R)
    if T < 2:
        return None
    return sum(R[T - 1][i] - R[i][i] for i in range(T - 1)) / (T - 1)


def forward_transfer(R: Matrix, b: Sequence[float]) -> float | None:
    T = _square(R)
    if len(b) != T:
        raise ValueError(f"b must have one base score per task ({T}), got {len(b)}")
    if T < 2:
        return None
    return sum(R[i - 1][i] - b[i] for i in range(1, T)) / (T - 1)


def forgetting(R: Matrix) -> float | None:
    T = _square(R)
    if T < 2:
        return None
    return sum(max(R[j][i] - R[T - 1][i] for j in range(T - 1)) for i in range(T - 1)) / (T - 1)


def summarize(R: Matrix, b: Sequence[float]) -> dict[str, float | None]:
    """AA always; BWT, FWT and FM when R is square (one row per task, not a joint run)."""
    out: dict[str, float | None] = {"AA": average_accuracy(R), "BWT": None, "FWT": None, "FM": None}
    if len(R) == len(R[-1]):
        out.update(BWT=backward_transfer(R), FWT=forward_transfer(R, b), FM=forgetting(R))
    return out
