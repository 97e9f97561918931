"""Tasks and streams: what a model learns, in order, and how each task is prompted and scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from retain.streams.sampling import Sample

Metric = Literal["exact_match", "choice", "perplexity", "rouge_l", "sari", "edit_similarity", "number",
                 "choice_letter"]
#: Metrics scored on generated answers, per item, on a 0-100 scale (see evaluation.text_metrics).
GENERATED = ("exact_match", "rouge_l", "sari", "edit_similarity", "number", "choice_letter")


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    options: tuple[str, ...] | None = None
    #: Every acceptable answer of a generated task, ``output`` first (SuperNI lists several);
    #: ROUGE-L, SARI and exact match score the best of them. None: ``output`` alone.
    references: tuple[str, ...] | None = None

    @property
    def answers(self) -> tuple[str, ...]:
        return self.references or (self.output,)

    @property
    def answer_index(self) -> int:
        """Index of the gold option (the output equals one of the options)."""
        assert self.options is not None
        return self.options.index(self.output)


@dataclass(frozen=True)
class Item:
    """A rendered training example: prompt and target text, tagged with its task."""

    task: str
    prompt: str
    target: str
    #: False: the loop puts no language-modelling loss on this item (a strategy scores it).
    lm_loss: bool = True


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    metric: Metric = "exact_match"
    format: Literal["plain", "chat"] = "plain"
    template: str = "{input}"
    answer_prefix: str | None = None
    #: Which test items a cap kept (``eval.max_test``, a task's ``max_test``); None: all.
    sample: "Sample | None" = None
    #: choice tasks: R records acc_norm (log-likelihood per character of the option) instead of acc.
    choice_norm: bool = False
    #: Generated tasks: answer length (None: ``eval.max_new_tokens``); summaries need more than labels.
    max_new_tokens: int | None = None

    @property
    def chance(self) -> float | None:
        """The score of a uniform random guess over each item's options; a guessed number is
        (almost) never right; None where chance has no single value (open text)."""
        if self.metric == "number":
            return 0.0
        if self.metric != "choice" or not self.test:
            return None
        return 100.0 * sum(1 / len(ex.options or ()) for ex in self.test) / len(self.test)

    @property
    def prefix(self) -> str:
        # Plain prompts end before the answer; BPE tokenizers attach the space to the
        # answer's first word, so the answer carries it. Chat answers start a turn.
        if self.answer_prefix is not None:
            return self.answer_prefix
        return "" if self.format == "chat" else " "

    def prompt(self, tokenizer, example: Example) -> str:
        text = self.template.format(input=example.input)
        if self.format == "chat":
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def target(self, text: str) -> str:
        return self.prefix + text

    def items(self, tokenizer, examples: list[Example] | None = None) -> list[Item]:
        examples = self.train if examples is None else examples
        return [Item(self.name, self.prompt(tokenizer, ex), self.target(ex.output)) for ex in examples]


@dataclass
class Stream:
    name: str
    tasks: list[Task]
    #: General-ability suites scored after every phase (``eval.probe``), each on its own.
    probes: list[Task] = field(default_factory=list)
    description: str = ""
    #: Named streams: which of the benchmark's task orders this is.
    order: int | None = None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]
