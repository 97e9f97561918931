"""Scoring tasks and filling the accuracy matrix."""

from retain.evaluation.scoring import generate, normalize, score_task

__all__ = ["generate", "normalize", "score_task"]
