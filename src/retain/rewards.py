"""Verifiable rewards for reward-driven fine-tuning (``es``, ``grpo``): the exact answer,
plus a small weight for the expected format, as in RL fine-tuning on math tasks."""

from __future__ import annotations

import ast
import re
from typing import Annotated, Literal

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


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBERS = re.compile(r"\[([\d,\s]+)\]")


def countdown_reward(answer: str, prompt: str, gold: str, format_weight: float) -> float:
    """Countdown: 1 when the equation in ``<answer>...</answer>`` (or the first line) uses each
    number of the prompt's ``[a, b, c]`` list exactly once and equals the target ``gold``;
    plus ``format_weight`` when the answer is wrapped in ``<answer>`` tags."""
    tagged = _ANSWER.search(answer)
    expr = (tagged.group(1) if tagged else answer.strip().split("\n", 1)[0]).strip()
    listed = _NUMBERS.search(prompt)
    shaped = format_weight * float(tagged is not None)
    if not listed or not re.fullmatch(r"[\d+\-*/().\s]+", expr or "x"):
        return shaped
    numbers = sorted(int(n) for n in listed.group(1).replace(",", " ").split())
    used = sorted(int(n) for n in re.findall(r"\d+", expr))
    try:
        value = _evaluate(ast.parse(expr, mode="eval").body)
        right = used == numbers and abs(value - float(gold.strip())) < 1e-6
    except (SyntaxError, ValueError, ZeroDivisionError):
        right = False
    return float(right) + shaped


def _evaluate(node: ast.AST) -> float:
    """Arithmetic on numbers and + - * / only (never Python's eval)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        return a * b if isinstance(node.op, ast.Mult) else a / b
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    raise ValueError("not plain arithmetic")


def score(kind: str, answer: str, prompt: str, gold: str, format_weight: float, pattern: str | None) -> float:
    """The reward ``kind`` ('exact' or 'countdown') of one answer."""
    if kind == "countdown":
        return countdown_reward(answer, prompt, gold, format_weight)
    return answer_reward(answer, gold, format_weight, pattern)


def check_pattern(pattern: str | None) -> str | None:
    """Validator for a ``format_pattern`` option: it must compile."""
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


#: Which verifier scores answers: the exact gold answer, or a valid Countdown equation.
RewardKind = Literal["exact", "countdown"]

#: An options field holding a regular expression for the answer's format.
FormatPattern = Annotated[str | None, AfterValidator(check_pattern)]
