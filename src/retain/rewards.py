"""Verifiable rewards for reward-driven fine-tuning (``es``, ``grpo``): the exact answer,
plus a small weight for the expected format, as in RL fine-tuning on math tasks."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from retain.evaluation.scoring import normalize


def answer_reward(answer: str, gold: str, format_weight: float, pattern: str | None) -> float:
    """1 for the exact answer, plus ``format_weight`` when the answer has the expected shape.

    Shape: the first line matches ``pattern`` (a regular expression), or, with no pattern,
    the answer has as many words as the gold one.
    """
    got, want = normalize(answer), normalize(gold)
    if pattern is not None:
        shaped = re.fullmatch(pattern, answer.strip().split("\n", 1)[0].strip()) is not None
    else:
        shaped = bool(got) and len(got.split()) == len(want.split())
    return float(got == want) + format_weight * float(shaped)


def check_pattern(pattern: str | None) -> str | None:
    """Validator for a ``format_pattern`` option: it must compile."""
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


#: An options field holding a regular expression for the answer's format.
FormatPattern = Annotated[str | None, AfterValidator(check_pattern)]
