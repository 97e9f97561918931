"""Generative replay (LAMOL-style): the model itself remembers old tasks; no example is kept.

While a task trains, a fraction of its examples is also trained as text generation from a
task prefix (``[gen <task>]`` -> the whole rendered example), so the model learns to
write examples of the task. Before each later task, it samples ``samples_per_task``
pseudo-examples of every earlier task from that prefix; a format filter keeps those that
parse back into the task's prompt template with a non-empty input and answer (for choice
tasks, an answer from the task's label set), and ``ratio`` of every batch is drawn from
them. The memory only ever holds generated text; ``strategy_stats`` records how many
pseudo-examples were generated and kept per task.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from retain.evaluation.scoring import eval_mode
from retain.streams.task import Example, Item, Task
from retain.strategies._memory import rng_state, set_rng_state
from retain.strategies.base import Context, Strategy, register

_MARK = "\x00"


class GenerativeReplayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(default=0.25, gt=0, lt=1, description="fraction of each batch drawn from pseudo-examples")
    gen_fraction: float = Field(default=0.25, gt=0, lt=1, description="fraction of each batch also trained as "
                                "generation from the task prefix")
    samples_per_task: int = Field(default=64, ge=1, description="pseudo-examples generated per earlier task")
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=64, ge=4, description="length limit of one generated example")


def gen_prefix(task: str) -> str:
    return f"[gen {task}]"


class PseudoFormat:
    """Parses generated text back into an example of ``task``: the task's rendered template
    around the input, then the answer."""

    def __init__(self, task: Task, tokenizer) -> None:
        self.task = task
        rendered = task.prompt(tokenizer, Example(_MARK, ""))
        self.head, _, self.tail = rendered.partition(_MARK)
        self.labels = {o for ex in task.train for o in (ex.options or ())}
        self.stops = [s for s in (tokenizer.eos_token, "\n") if s]

    def parse(self, text: str) -> Item | None:
        if not text.startswith(self.head) or not self.tail:
            return None
        rest = text[len(self.head):]
        user, sep, answer = rest.partition(self.tail)
        answer = answer[len(self.task.prefix):] if answer.startswith(self.task.prefix) else answer
        for stop in self.stops:
            answer = answer.split(stop)[0]
        answer = answer.strip()
        if not sep or not user.strip() or _MARK in user or not answer:
            return None
        if self.task.metric == "choice" and self.labels and answer not in self.labels:
            return None
        return Item(self.task.name, self.head + user + self.tail, self.task.target(answer))


@register
class GenerativeReplay(Strategy):
    name = "generative-replay"
    not_private = ""  # pseudo-examples come from the privately trained model: post-processing
    data_parallel = ""  # its sampling is seeded by the phase, so every process draws the same pseudo-data
    sharded = "its pseudo-data is sampled from the model between phases, not yet run on sharded weights"
    summary = "LAMOL-style: the model learns to generate each task's examples and replays its own pseudo-examples"
    options_key = "generative_replay"
    Options = GenerativeReplayOptions
    acts_on_earlier = True

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.pseudo: list[Item] = []
        self.trained: list[str] = []
        self._counts: dict[str, dict[str, int]] = {}
        self._rng = random.Random(0)

    def setup(self, ctx: Context):
        self._rng = random.Random(f"generative-replay/{ctx.config.seed}")
        return None

    @torch.no_grad()
    def sample(self, ctx: Context, task: Task) -> tuple[list[Item], int]:
        """Pseudo-examples of ``task`` that pass the format filter, and how many were generated."""
        o, tok, model = self.options, ctx.tokenizer, ctx.model
        ids = tok(gen_prefix(task.name), return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
        fmt, kept, made = PseudoFormat(task, tok), [], 0
        with eval_mode(model):
            while made < o.samples_per_task:
                n = min(16, o.samples_per_task - made)
                # eos_token_id=None: a chat-format example holds the end-of-turn token (often the
                # eos) after the user turn, and stopping there would cut every example in half;
                # the parser cuts the answer at its end instead.
                out = model.generate(input_ids=ids.expand(n, -1), attention_mask=torch.ones_like(ids).expand(n, -1),
                                     do_sample=True, temperature=o.temperature, top_k=0, top_p=1.0,
                                     max_new_tokens=o.max_new_tokens, pad_token_id=tok.pad_token_id,
                                     eos_token_id=None)
                for row in out[:, ids.shape[1]:]:
                    item = fmt.parse(tok.decode(row, skip_special_tokens=False).lstrip())
                    if item is not None:
                        kept.append(item)
                made += n
        return kept, made

    def before_task(self, ctx: Context, tasks) -> None:
        self.pseudo = []
        torch.manual_seed(ctx.phase_seed)
        for old in [t for t in ctx.stream.tasks if t.name in self.trained]:
            kept, made = self.sample(ctx, old)
            self._counts[old.name] = {"generated": made, "kept": len(kept)}
            self.pseudo.extend(kept)

    def _draw(self, k: int) -> list[Item]:
        return [self._rng.choice(self.pseudo) for _ in range(k)] if self.pseudo else []

    def batches(self, ctx: Context, tasks, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        """Per batch: ``ratio`` pseudo-examples, ``gen_fraction`` of the new examples turned
        into generation targets (prefix -> whole example), the rest trained as usual."""
        o = self.options
        for batch in batches:
            n = len(batch)
            k_replay = round(o.ratio * n) if self.pseudo else 0
            k_gen = min(max(1, round(o.gen_fraction * n)), n - k_replay)
            new = batch[: n - k_replay]
            gen = [Item(it.task, gen_prefix(it.task), " " + it.prompt + it.target) for it in new[:k_gen]]
            yield new[k_gen:] + gen + self._draw(k_replay)

    def after_task(self, ctx: Context, tasks) -> None:
        self.trained.extend(t.name for t in tasks)

    def stats(self) -> dict:
        return {"pseudo_examples": dict(self._counts)} if self._counts else {}

    def state_dict(self) -> dict:
        return {"trained": list(self.trained), "pseudo": [[i.task, i.prompt, i.target] for i in self.pseudo],
                "rng": rng_state(self._rng)}

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        self.trained = list(state.get("trained", []))
        self.pseudo = [Item(*row) for row in state.get("pseudo", [])]
        if "rng" in state:
            set_rng_state(self._rng, state["rng"])
