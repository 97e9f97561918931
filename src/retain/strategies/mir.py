"""MIR: maximally interfered retrieval (Aljundi et al. 2019), a task-free replay.

Every example that trains enters a reservoir memory. Before a batch trains, ``candidates``
memory examples are drawn; a virtual SGD step on the incoming batch (learning rate
``lr``, default ``train.lr``) is taken, and the ``retrieve`` candidates whose loss it raises
most are trained with the batch: the old examples the new data is about to overwrite.
The weights are copied before the virtual step and copied back after, so the step leaves
no trace. Works with and without task boundaries (``online:``).

Written by hand: no library of the field implements MIR for causal language models.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from retain.batching import collate
from retain.evaluation.scoring import continuation_logprobs, eval_mode
from retain.lm_loss import lm_outputs
from retain.streams.task import Item
from retain.strategies._memory import Reservoir, rng_state, set_rng_state
from retain.strategies.base import Context, Strategy, register


class MIROptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    buffer_size: int = Field(default=200, ge=1, description="examples kept in the reservoir memory")
    candidates: int = Field(default=50, ge=1, description="memory examples scored before each step")
    retrieve: int | None = Field(default=None, ge=1, description="of those, how many train with the batch "
                                 "(default: the batch size)")
    lr: float | None = Field(default=None, gt=0, description="the virtual SGD step's learning rate (default: "
                             "train.lr)")


def example_losses(ctx: Context, items: list[Item]) -> torch.Tensor:
    """Each item's mean token loss on its target (as the training loss counts it), without dropout."""
    tok = ctx.tokenizer
    with eval_mode(ctx.model):
        scored = continuation_logprobs(ctx.model, tok, [(i.prompt, i.target + tok.eos_token) for i in items],
                                       ctx.config.eval.batch_size)
    return torch.tensor([-lp / max(n, 1) for lp, n in scored])


def interference(ctx: Context, batch: list[Item], candidates: list[Item], lr: float) -> torch.Tensor:
    """How much one SGD step on ``batch`` raises each candidate's loss (the weights are restored exactly)."""
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    before = example_losses(ctx, candidates)
    saved = [p.detach().clone() for p in params]
    inputs = {k: v.to(params[0].device) for k, v in collate(ctx.tokenizer, batch, ctx.config.train.max_length).items()}
    with eval_mode(ctx.model):
        loss = lm_outputs(ctx.model, inputs).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(lr * g)
        after = example_losses(ctx, candidates)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return after - before


@register
class MIR(Strategy):
    name = "mir"
    not_private = "it picks which memories to replay by their loss on private examples outside the noised step"
    data_parallel = ("its virtual update and retrieval act on the model inside each step, outside the "
                     "split step")
    sharded = "it runs in online mode, which runs in one process"
    summary = "maximally interfered retrieval: replay the memory examples a virtual step on the batch hurts most"
    task_free = True
    options_key = "mir"
    Options = MIROptions
    acts_on_earlier = True

    def __init__(self, options: MIROptions | None = None) -> None:
        super().__init__(options)
        self.memory = Reservoir(self.options.buffer_size, "mir/0")
        self.rng = random.Random("mir/draw/0")
        self._pending: list[Item] | None = None
        self.retrieved = 0

    def setup(self, ctx: Context):
        self.memory = Reservoir(self.options.buffer_size, f"mir/{ctx.config.seed}")
        self.rng = random.Random(f"mir/draw/{ctx.config.seed}")
        return None

    def _take_pending(self) -> None:
        if self._pending is not None:
            for item in self._pending:
                self.memory.offer(item)
            self._pending = None

    def batches(self, ctx: Context, tasks, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        for batch in batches:
            if batch is not self._pending:  # a new batch: the one before has trained and joins the memory
                self._take_pending()
                self._pending = batch
            yield batch + self.select(ctx, batch)

    def select(self, ctx: Context, batch: list[Item]) -> list[Item]:
        records = self.memory.records
        if not records:
            return []
        candidates = self.rng.sample(records, min(self.options.candidates, len(records)))
        k = min(self.options.retrieve or len(batch), len(candidates))
        self.retrieved += k
        if ctx.fast_forward:  # the draws above keep the RNG in step; the virtual step would cost a real one
            return candidates[:k]
        scores = interference(ctx, batch, candidates, self.options.lr or ctx.config.train.lr)
        picked = torch.argsort(scores, descending=True, stable=True)[:k].tolist()
        return [candidates[i] for i in picked]

    def after_task(self, ctx: Context, tasks) -> None:
        self._take_pending()

    def stats(self) -> dict:
        return {"memory_examples": len(self.memory.records), "retrieved": self.retrieved}

    def state_dict(self) -> dict:
        return {"memory": self.memory.state(lambda i: [i.task, i.prompt, i.target]), "rng": rng_state(self.rng),
                "retrieved": self.retrieved}

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        if state:
            self.memory.load(state["memory"], lambda row: Item(*row))
            set_rng_state(self.rng, state["rng"])
            self.retrieved = state.get("retrieved", 0)
