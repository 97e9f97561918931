"""Built-in offline streams and the general-ability probe, shipped inside the package.

``numbers``: four yes/no questions about the same three-digit numbers, each with its
own rule. The inputs and the answer words are shared, so learning one rule overwrites
the others unless the method protects them: naive fine-tuning forgets measurably.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from typing import Callable

from retain.errors import RetainError
from retain.streams.task import Example, Stream, Task

_RULES: list[tuple[str, str, Callable[[int], bool]]] = [
    ("parity", "Is {n} an even number?", lambda n: n % 2 == 0),
    ("magnitude", "Is {n} greater than 550?", lambda n: n > 550),
    ("has-seven", "Does {n} contain the digit 7?", lambda n: "7" in str(n)),
    ("odd-lead", "Does {n} start with an odd digit?", lambda n: int(str(n)[0]) % 2 == 1),
]
_TEMPLATE = "{input}\nAnswer:"


def _rule_task(name: str, question: str, rule: Callable[[int], bool], n_train: int, n_test: int, seed: int) -> Task:
    rng = random.Random(f"numbers/{name}/{seed}")
    pool = list(range(100, 1000))
    rng.shuffle(pool)
    yes = [n for n in pool if rule(n)]
    no = [n for n in pool if not rule(n)]
    half_train, half_test = n_train // 2, n_test // 2
    if min(len(yes), len(no)) < half_train + half_test:
        raise RetainError(f"built-in task {name}: not enough numbers for {n_train}+{n_test} examples")

    def examples(numbers: list[int]) -> list[Example]:
        out = [Example(question.format(n=n), "yes" if rule(n) else "no", ("yes", "no")) for n in numbers]
        rng.shuffle(out)
        return out

    test = examples(yes[:half_test] + no[:half_test])
    train = examples(yes[half_test : half_test + half_train] + no[half_test : half_test + half_train])
    return Task(name, train, test, metric="choice", template=_TEMPLATE)


def numbers_stream(n_train: int = 400, n_test: int = 100, seed: int = 0) -> Stream:
    tasks = [_rule_task(name, q, rule, n_train, n_test, seed) for name, q, rule in _RULES]
    return Stream("numbers", tasks, description="four interfering yes/no rules over three-digit numbers")


BUILTIN_STREAMS: dict[str, tuple[Callable[[], Stream], str]] = {
    "numbers": (numbers_stream, "4 yes/no rules over the same 3-digit numbers (parity, magnitude, has-seven, odd-lead)"),
}


def builtin_stream(name: str) -> Stream:
    if name not in BUILTIN_STREAMS:
        raise RetainError(f"unknown stream '{name}'; built-in streams: {', '.join(sorted(BUILTIN_STREAMS))}")
    return BUILTIN_STREAMS[name][0]()


def probe_task(limit: int | None = None) -> Task:
    """General knowledge the embedded model already has (facts it scores right before training).

    Built by ``scripts/build_probe.py``: candidate facts with four options, kept only where
    the base SmolLM2-135M-Instruct ranks the right option first.
    """
    text = resources.files("retain.streams").joinpath("data/probe.jsonl").read_text(encoding="utf-8")
    examples = []
    for line in text.splitlines():
        rec = json.loads(line)
        examples.append(Example(rec["input"], rec["output"], tuple(rec["options"])))
    if limit:
        examples = examples[:limit]
    return Task("probe", [], examples, metric="choice", template="Question: {input}\nAnswer:")
