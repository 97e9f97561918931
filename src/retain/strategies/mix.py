"""Data mixing for continual pre-training: every batch draws a fraction of its examples from
all earlier stages' training data (not a bounded memory, unlike ``replay``)."""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from retain.streams.task import Item
from retain.strategies.base import Context, Strategy, register
from retain.strategies._memory import mix_batches


class MixOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(default=0.5, gt=0, lt=1, description="fraction of each batch from earlier stages")


@register
class Mix(Strategy):
    name = "mix"
    not_private = ""  # its general data is public: only the stream's examples are private
    data_parallel = ""  # its draws are seeded: every process mixes the same global batch
    sharded = ""  # its draws are seeded alike on every process; it only changes the batches
    summary = "each batch mixes a fraction `ratio` (default 0.5) of all earlier stages' data"
    options_key = "mix"
    Options = MixOptions

    def __init__(self, options: MixOptions | None = None) -> None:
        super().__init__(options)
        self.pool: list[Item] = []
        self.rng = random.Random(0)

    def before_task(self, ctx: Context, tasks) -> None:
        self.rng = random.Random(f"mix/{ctx.config.seed}/{ctx.phase}")

    def batches(self, ctx: Context, tasks, batches):
        def draw(k: int) -> list[Item]:
            return [self.rng.choice(self.pool) for _ in range(k)] if self.pool else []

        return mix_batches(batches, draw, self.options.ratio, [])

    def after_task(self, ctx: Context, tasks) -> None:
        self.pool.extend(it for t in tasks for it in t.items(ctx.tokenizer))

    def state_dict(self) -> dict:
        return {"pool": [[i.task, i.prompt, i.target] for i in self.pool]}

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        self.pool = [Item(*row) for row in state.get("pool", [])]
