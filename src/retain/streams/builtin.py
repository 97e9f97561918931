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


_DOMAINS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "recipes": (
        ["To make {dish}, {verb} {qty} of {food} with a pinch of {spice}.",
         "Cook the {food} over {heat} heat for {n} minutes, then add the {spice}.",
         "Serve the {dish} warm with {side}."],
        {"dish": ["lentil soup", "tomato pasta", "rice pudding", "vegetable curry", "apple pie", "fish stew"],
         "verb": ["mix", "whisk", "stir", "combine", "fold"], "qty": ["two cups", "one spoon", "half a cup", "three pinches"],
         "food": ["flour", "lentils", "rice", "onions", "apples", "carrots", "butter"],
         "spice": ["salt", "cumin", "cinnamon", "pepper", "paprika"], "heat": ["low", "medium", "high"],
         "n": [str(i) for i in range(3, 40)], "side": ["bread", "a green salad", "yogurt", "lemon wedges"]},
    ),
    "weather": (
        ["Weather for {city}: {cond} in the morning with {temp} degrees by noon.",
         "Winds from the {dir} at {speed} kilometres per hour, {rain} chance of rain.",
         "Tomorrow will be {cond2} with a low of {low} degrees."],
        {"city": ["Oslo", "Lima", "Cairo", "Osaka", "Quito", "Perth", "Tunis", "Riga"],
         "cond": ["sunny", "cloudy", "foggy", "rainy", "windy"], "cond2": ["clear", "overcast", "stormy", "mild"],
         "temp": [str(i) for i in range(-5, 38)], "low": [str(i) for i in range(-12, 25)],
         "dir": ["north", "south", "east", "west", "northwest"], "speed": [str(i) for i in range(5, 60, 5)],
         "rain": ["a low", "a moderate", "a high"]},
    ),
    "football": (
        ["{team} beat {rival} {a} to {b} on {day} in front of {crowd} fans.",
         "{player} scored in the {minute}th minute after a pass from {player2}.",
         "The coach said the {team} defence was {word} all game."],
        {"team": ["Rovers", "United", "Athletic", "Wanderers", "City", "Albion"],
         "rival": ["Rangers", "Town", "Harriers", "Dynamo", "Olympic", "County"],
         "a": ["2", "3", "4", "1"], "b": ["0", "1"], "day": ["Saturday", "Sunday", "Tuesday", "Wednesday"],
         "crowd": [f"{i},000" for i in range(5, 60, 5)], "player": ["Silva", "Okafor", "Jensen", "Moreau", "Tanaka"],
         "player2": ["Novak", "Costa", "Haddad", "Berg", "Ito"], "minute": [str(i) for i in range(4, 90)],
         "word": ["solid", "shaky", "brilliant", "calm", "tireless"]},
    ),
}


def _domain_task(name: str, n_train: int, n_test: int, seed: int) -> Task:
    sentences, slots = _DOMAINS[name]
    rng = random.Random(f"domains/{name}/{seed}")
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < n_train + n_test:
        text = " ".join(s.format(**{k: rng.choice(v) for k, v in slots.items()}) for s in sentences)
        if text not in seen:
            seen.add(text)
            texts.append(text)
    examples = [Example("", t) for t in texts]
    return Task(name, examples[n_test:], examples[:n_test], metric="perplexity", answer_prefix="")


def domains_stream(n_train: int = 300, n_test: int = 50, seed: int = 0) -> Stream:
    return Stream("domains", [_domain_task(n, n_train, n_test, seed) for n in _DOMAINS],
                  description="three raw-text domains for continual pre-training, scored by perplexity")


def arithmetic_stream(n_test: int = 50, seed: int = 0) -> Stream:
    """One multiplication task with a verifiable answer in a fixed format, for reward-driven
    fine-tuning (ES, GRPO) against supervised fine-tuning.

    a in 2..19, b in 2..9 (144 products); the embedded model answers some right in the
    asked format ("7 * 8 = 56") and many not, so the reward has room to rise.
    """
    rng = random.Random(f"arithmetic/{seed}")
    pairs = [(a, b) for a in range(2, 20) for b in range(2, 10)]
    rng.shuffle(pairs)
    examples = [Example(f"What is {a} * {b}? Answer in the form '{a} * {b} = result'.", f"{a} * {b} = {a * b}")
                for a, b in pairs]
    task = Task("multiply", examples[n_test:], examples[:n_test], metric="exact_match", format="chat")
    return Stream("arithmetic", [task], description="one-digit and teen multiplication, exact answer")


BUILTIN_STREAMS: dict[str, tuple[Callable[[], Stream], str]] = {
    "numbers": (numbers_stream, "4 yes/no rules over the same 3-digit numbers (parity, magnitude, has-seven, odd-lead)"),
    "arithmetic": (arithmetic_stream, "1 task: multiplication with an exact answer 'a * b = c' (chat format); "
                   "for ES against SFT and GRPO"),
    "domains": (domains_stream, "3 raw-text domains (recipes, weather, football) for continual pre-training; perplexity"),
}


def builtin_stream(name: str) -> Stream:
    if name not in BUILTIN_STREAMS:
        raise RetainError(f"unknown stream '{name}'; built-in streams: {', '.join(sorted(BUILTIN_STREAMS))}")
    return BUILTIN_STREAMS[name][0]()


def probe_task(limit: int | None = None, path: str | None = None, template: str = "Question: {input}\nAnswer:") -> Task:
    """General knowledge the model already has, scored by choice log-likelihood.

    The built-in probe (``scripts/build_probe.py``): candidate facts with four options, kept
    only where the base SmolLM2-135M-Instruct ranks the right option first. ``path``: your
    own probe file (input, output, options), e.g. HellaSwag converted to that form.
    """
    from retain.streams.loaders import load_file

    if path is not None:
        # As a choice task: every line needs options; the output may be an option's index.
        examples = load_file(path, input_field="input", output_field="output", options_field="options",
                             metric="choice")
        if not examples:
            raise RetainError(f"eval.probe_file {path} has no examples")
    else:
        text = resources.files("retain.streams").joinpath("data/probe.jsonl").read_text(encoding="utf-8")
        examples = [Example(rec["input"], rec["output"], tuple(rec["options"]))
                    for rec in map(json.loads, text.splitlines())]
    if limit:
        examples = examples[:limit]
    return Task("probe", [], examples, metric="choice", template=template)
