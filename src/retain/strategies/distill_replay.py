"""Replay with the teacher's soft targets: each memory example keeps the model's top-k token
log-probabilities from when it was stored, and replayed examples are trained to match them
(cross-entropy to the renormalized top-k distribution) instead of only the gold text.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from retain.batching import collate, target_mask
from retain.evaluation.scoring import eval_mode
from retain.streams.task import Item
from retain.strategies.base import Context, Strategy, register
from retain.strategies._memory import Reservoir, mix_batches


class DistillReplayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    buffer_size: int = Field(default=200, ge=1)
    ratio: float = Field(default=0.25, gt=0, lt=1, description="fraction of each batch drawn from memory")
    top_k: int = Field(default=8, ge=1, le=1024, description="log-probabilities stored per target position")
    alpha: float = Field(default=1.0, ge=0, description="weight of the distillation term")


@dataclasses.dataclass
class Record:
    item: Item
    ids: torch.Tensor | None = None  # [positions, k] token ids
    logp: torch.Tensor | None = None  # [positions, k] teacher log-probabilities


def predicting_positions(mask_row: torch.Tensor) -> torch.Tensor:
    """Indices of the logits that predict the target tokens (one before each target token)."""
    return mask_row.nonzero().squeeze(-1) - 1


@torch.no_grad()
def top_k_targets(model, tokenizer, items: list[Item], k: int, max_length: int, batch_size: int = 32):
    """Per item: (ids, logp) of the model's k most likely tokens at each target position."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = collate(tokenizer, chunk, max_length)
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            mask = batch["labels"] != -100
            for r in range(len(chunk)):
                logp = F.log_softmax(logits[r, predicting_positions(mask[r])].float(), dim=-1)
                values, ids = logp.topk(k, dim=-1)
                out.append((ids.cpu(), values.cpu()))
    return out


@register
class DistillReplay(Strategy):
    name = "distill-replay"
    not_private = "its distillation term is added to the batch's loss outside retain's per-example loss"
    data_parallel = ""  # its term is summed over each share and divided by the global count of positions
    sharded = "it records the teacher's outputs with a model copy outside the sharded model"
    summary = "replay that trains memory examples to match the teacher's stored top-k log-probabilities"
    options_key = "distill-replay"
    Options = DistillReplayOptions
    acts_on_earlier = True
    reads_logits = True

    def __init__(self, options: DistillReplayOptions | None = None) -> None:
        super().__init__(options)
        self.memory = Reservoir(self.options.buffer_size)
        self._fresh: list[Item] = []
        self._replayed: dict[int, Record] = {}

    def setup(self, ctx: Context):
        self.memory = Reservoir(self.options.buffer_size, f"distill-replay/{ctx.config.seed}")
        return None

    def _draw(self, k: int) -> list[Item]:
        self._replayed = {}
        if not self.memory.records:
            return []
        drawn = []
        for _ in range(k):
            record = self.memory.rng.choice(self.memory.records)
            item = dataclasses.replace(record.item, lm_loss=False)
            self._replayed[id(item)] = record
            drawn.append(item)
        return drawn

    def batches(self, ctx: Context, tasks, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        self._fresh = []
        return mix_batches(batches, self._draw, self.options.ratio, self._fresh)

    def extra_loss(self, ctx: Context, batch, outputs, items):
        rows = [(r, self._replayed[id(it)]) for r, it in enumerate(items) if id(it) in self._replayed]
        if self.options.alpha == 0 or not self._replayed:  # the same on every process
            return None
        if not rows:  # this process's share holds no replayed item; it still counts with the others
            ctx.processes.mean(torch.zeros(()), 0.0)
            return None
        mask = target_mask(ctx.tokenizer, items, ctx.config.train.max_length).to(outputs.logits.device)
        losses = []
        for r, record in rows:
            student = F.log_softmax(outputs.logits[r, predicting_positions(mask[r])].float(), dim=-1)
            ids, logp = record.ids.to(student.device), record.logp.to(student.device)
            teacher = torch.softmax(logp, dim=-1)  # renormalized over the stored top-k
            losses.append(-(teacher * student.gather(-1, ids)).sum(-1))
        terms = torch.cat(losses)
        return self.options.alpha * ctx.processes.mean(terms.sum(), float(terms.numel()))

    def after_task(self, ctx: Context, tasks) -> None:
        for item in self._fresh:
            self.memory.offer(Record(item))
        self._fresh = []
        pending = [r for r in self.memory.records if r.ids is None]
        targets = top_k_targets(ctx.model, ctx.tokenizer, [r.item for r in pending], self.options.top_k,
                                ctx.config.train.max_length)
        for record, (ids, logp) in zip(pending, targets):
            record.ids, record.logp = ids, logp

    def state_dict(self) -> dict:
        return self.memory.state(lambda r: [r.item.task, r.item.prompt, r.item.target])

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        if state:
            self.memory.load(state, lambda row: Record(Item(*row)))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, r in enumerate(self.memory.records):
            out[f"{i}/ids"], out[f"{i}/logp"] = r.ids, r.logp
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, r in enumerate(self.memory.records):
            r.ids, r.logp = tensors[f"{i}/ids"], tensors[f"{i}/logp"]
