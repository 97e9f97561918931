"""Experience replay: a bounded memory of past examples mixed into every batch.

Which examples the memory keeps is the ``policy``: ``reservoir`` (a uniform sample of all
examples trained on), ``coreset`` (k-center greedy on the model's sentence embeddings, so
the memory covers each task's inputs), or ``surprise`` (the examples with the highest
loss under the model when their task ends: what it is most likely to lose). The budget
is ``buffer_size`` examples or ``budget_tokens`` tokens; coreset, surprise and any token
budget split it equally among the tasks seen, each task keeping a prefix of its ranking.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from retain.streams.task import Item
from retain.strategies._memory import Reservoir, mix_batches, rng_state, set_rng_state
from retain.strategies._selection import highest_first, k_center_greedy, shuffled
from retain.strategies.base import Context, Strategy, register

Policy = Literal["reservoir", "coreset", "surprise"]


class ReplayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    buffer_size: int = Field(default=200, ge=1, description="examples kept in memory across all past tasks")
    budget_tokens: int | None = Field(default=None, ge=1, description="bound the memory by tokens (prompt + "
                                      "answer) instead of examples")
    ratio: float = Field(default=0.25, gt=0, lt=1, description="fraction of each batch drawn from memory")
    policy: Policy = Field(default="reservoir", description="which examples stay: reservoir, coreset or surprise")

    @model_validator(mode="after")
    def _one_budget(self) -> "ReplayOptions":
        if self.budget_tokens is not None and "buffer_size" in self.model_fields_set:
            raise ValueError("give buffer_size (examples) or budget_tokens (tokens), not both")
        return self


class TaskMemory:
    """Per task, its candidates ranked best first; the budget is shared equally by the tasks
    seen, each keeping the longest prefix of its ranking that fits its share."""

    def __init__(self, budget: int, cost: Callable[[Item], int] | None = None, seed: str = "replay/0") -> None:
        self.budget = budget
        self._cost = cost
        self._costs: dict[tuple[str, str], int] = {}
        self.ranked: dict[str, list[Item]] = {}
        self.rng = random.Random(seed)
        self._records: list[Item] | None = None

    def cost(self, item: Item) -> int:
        if self._cost is None:
            return 1
        key = (item.prompt, item.target)
        if key not in self._costs:
            self._costs[key] = self._cost(item)
        return self._costs[key]

    def add_task(self, task: str, ranked: list[Item]) -> None:
        self.ranked[task] = self._prefix(ranked, self.budget)
        self._records = None

    def _prefix(self, items: list[Item], limit: int) -> list[Item]:
        kept, used = [], 0
        for item in items:
            used += self.cost(item)
            if used > limit:
                break
            kept.append(item)
        return kept

    @property
    def records(self) -> list[Item]:
        if self._records is None:
            share = self.budget // max(len(self.ranked), 1)
            self._records = [item for ranked in self.ranked.values() for item in self._prefix(ranked, share)]
        return self._records

    def per_task(self) -> dict[str, int]:
        share = self.budget // max(len(self.ranked), 1)
        return {task: len(self._prefix(ranked, share)) for task, ranked in self.ranked.items()}

    def state(self, encode: Callable[[Any], Any]) -> dict:
        return {"rng": rng_state(self.rng),
                "ranked": {task: [encode(r) for r in items] for task, items in self.ranked.items()}}

    def load(self, state: dict, decode: Callable[[Any], Any]) -> None:
        set_rng_state(self.rng, state["rng"])
        self.ranked = {task: [decode(r) for r in items] for task, items in state["ranked"].items()}
        self._records = None


def rank(policy: Policy, ctx: Context, items: list[Item], limit: int, seed: str) -> list[Item]:
    """``items`` of one task in the policy's priority order (at least ``limit`` of them when there are)."""
    if policy == "reservoir":
        return [items[i] for i in shuffled(len(items), seed)]
    texts = [it.prompt + it.target for it in items]
    batch = ctx.config.eval.batch_size
    if policy == "coreset":
        from retain.embeddings import embed_texts

        points = embed_texts(ctx.model, ctx.tokenizer, texts, batch, ctx.config.train.max_length)
        return [items[i] for i in k_center_greedy(points, limit)]
    from retain.evaluation.scoring import continuation_logprobs, eval_mode

    with eval_mode(ctx.model):
        scored = continuation_logprobs(ctx.model, ctx.tokenizer, [(it.prompt, it.target) for it in items], batch)
    return [items[i] for i in highest_first([-lp / max(n, 1) for lp, n in scored])]


@register
class Replay(Strategy):
    name = "replay"
    not_private = ""
    # Memory draws are seeded, so every process holds the same memory; the coreset and surprise
    # policies score the items on every process (the same result, not split).
    data_parallel = ""
    sharded = ""  # its memory is drawn alike on every process; it only changes the batches
    summary = "reservoir-sampled memory of past examples; a fraction `ratio` of each batch is replayed"
    task_free = True
    options_key = "replay"
    Options = ReplayOptions
    acts_on_earlier = True

    def __init__(self, options: ReplayOptions | None = None) -> None:
        super().__init__(options)
        self.memory: Reservoir | TaskMemory = self._memory(None, 0)
        self._current: list[Item] = []
        self._pending: list[Item] | None = None  # online: the batch training now, added when the next comes

    def _memory(self, ctx: Context | None, seed: int) -> Reservoir | TaskMemory:
        o = self.options
        if o.policy == "reservoir" and o.budget_tokens is None:
            return Reservoir(o.buffer_size, f"replay/{seed}")
        if o.budget_tokens is None:
            return TaskMemory(o.buffer_size, None, f"replay/{seed}")
        tokenizer = ctx.tokenizer if ctx is not None else None

        def tokens(item: Item) -> int:
            if tokenizer is None:
                raise RuntimeError("replay.budget_tokens counts tokens: set the strategy up with the run first")
            return len(tokenizer(item.prompt + item.target)["input_ids"])
        return TaskMemory(o.budget_tokens, tokens, f"replay/{seed}")

    @property
    def buffer(self) -> list[Item]:
        return self.memory.records

    def setup(self, ctx: Context):
        self.memory = self._memory(ctx, ctx.config.seed)
        return None

    def add(self, item: Item) -> None:
        self.memory.offer(item)

    def _draw(self, k: int) -> list[Item]:
        if not self.buffer:
            return []
        return [self.memory.rng.choice(self.buffer) for _ in range(k)]

    def check(self, config, stream) -> None:
        if config.privacy is not None and (self.options.policy != "reservoir" or self.options.budget_tokens):
            raise ValueError("privacy: replay.policy coreset and surprise rank private examples by their embeddings "
                             "or losses, and a token budget by their length, outside the noised step; use "
                             "policy reservoir with buffer_size")
        if config.online is not None and (self.options.policy != "reservoir" or self.options.budget_tokens):
            raise ValueError("online mode needs replay.policy reservoir with buffer_size: the other memories rank "
                             "each task's examples at the task's end, which online mode hides")

    def batches(self, ctx: Context, tasks, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        self._current = []
        if ctx is not None and ctx.config.online is not None:
            return self._online(batches)
        if ctx is not None and ctx.config.privacy is not None:
            return self._private(ctx, batches)
        return mix_batches(batches, self._draw, self.options.ratio, self._current)

    def _online(self, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        """Online: every incoming example trains (memory draws are added, not swapped in), and
        enters the reservoir once it has trained, so the memory is always a sample of the past."""
        for batch in batches:
            if self._pending is not None and batch is not self._pending:  # a new batch (passes repeat one)
                for item in self._pending:
                    self.add(item)
            self._pending = batch
            # ``ratio`` stays the replayed fraction of what trains: k of B + k items.
            k = round(self.options.ratio * len(batch) / (1 - self.options.ratio))
            yield batch + self._draw(k)

    def _expected_draws(self, ctx: Context) -> float:
        # ``ratio`` stays the replayed fraction of what trains, as in online mode.
        return self.options.ratio * ctx.config.train.batch_size / (1 - self.options.ratio)

    def private_replay_rate(self, ctx: Context) -> float:
        return min(1.0, self._expected_draws(ctx) / len(self.buffer)) if self.buffer else 0.0

    def _private(self, ctx: Context, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        """Under DP-SGD: the memory is Poisson-sampled like the new examples (each record with
        the same rate every step), which the accountant composes into earlier tasks' budgets."""
        from retain.privacy import poisson_draw

        rate = self.private_replay_rate(ctx)
        for batch in batches:
            self._current.extend(batch)
            yield batch + poisson_draw(self.buffer, rate, self.memory.rng)

    def after_task(self, ctx: Context, tasks) -> None:
        if ctx is not None and ctx.config.privacy is not None:
            # Each private example enters memory once: a copy would double its replay rate.
            self._current = list({(i.prompt, i.target): i for i in self._current}.values())
        if self._pending is not None:  # online: the stream's last batch joins the memory too
            for item in self._pending:
                self.add(item)
            self._pending = None
        if isinstance(self.memory, Reservoir):
            for item in self._current:
                self.add(item)
        else:
            by_task: dict[str, dict[tuple[str, str], Item]] = {}
            for item in self._current:  # each distinct example once, in the order first trained
                by_task.setdefault(item.task, {}).setdefault((item.prompt, item.target), item)
            for task, items in by_task.items():
                seed = f"replay/{ctx.config.seed if ctx else 0}/{task}"
                self.memory.add_task(task, rank(self.options.policy, ctx, list(items.values()),
                                                self.memory.budget, seed))
        self._current = []

    def stats(self) -> dict:
        records = self.buffer
        out = {"memory_examples": len(records), "memory_policy": self.options.policy}
        if isinstance(self.memory, TaskMemory):
            out["memory_per_task"] = self.memory.per_task()
            if self.options.budget_tokens is not None:
                out["memory_tokens"] = sum(self.memory.cost(r) for r in records)
        return out

    def state_dict(self) -> dict:
        return self.memory.state(lambda i: [i.task, i.prompt, i.target])

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        if state:
            self.memory.load(state, lambda row: Item(*row))
