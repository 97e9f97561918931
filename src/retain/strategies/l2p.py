"""L2P (Learning to Prompt): a pool of learnable soft prompts with keys; the frozen base
model's mean-pooled hidden states of the input are the query, the top-N prompts by
key-query cosine similarity are prepended as soft tokens. The base never changes.

The pool is split equally among the stream's tasks. While task t trains, the top-N are
chosen among task t's prompts and only they (prompts and keys) can change, so earlier
tasks' prompts stay bit-identical; at inference the top-N are chosen over the whole pool,
with no task identity (the keys, pulled toward their task's queries by the surrogate loss
``key_weight * (1 - cos(q, k))``, do the routing).

Written by hand: PEFT's prompt tuning has one fixed prompt per adapter and no key-query
selection. The model is wrapped so that the loop, the scorers and ``generate`` keep
passing token ids: the wrapper inserts placeholder ids where the prompt goes (before a
row's first real token), the input-embedding hook swaps in the selected soft prompts, and
the logits of the inserted positions are dropped again, so callers see their own shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from retain.embeddings import ModelWrapper, pooled_query
from retain.strategies.base import Context, Strategy, register


class L2POptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool_size: int = Field(default=20, ge=1, description="prompts in the pool, split equally among the tasks")
    prompt_length: int = Field(default=5, ge=1, description="soft tokens per prompt")
    top_n: int = Field(default=3, ge=1, description="prompts selected per input")
    key_weight: float = Field(default=0.5, ge=0, description="weight of the key-query surrogate loss")

    @model_validator(mode="after")
    def _fits(self) -> "L2POptions":
        if self.top_n > self.pool_size:
            raise ValueError(f"top_n ({self.top_n}) cannot exceed pool_size ({self.pool_size})")
        return self


class PromptPool(ModelWrapper):
    """The model with a prompt pool in front of it (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, options: L2POptions, task_names: list[str]) -> None:
        super().__init__(model)
        self.options = options
        self.added_positions = options.top_n * options.prompt_length
        per_task = options.pool_size // len(task_names)
        if per_task < options.top_n:
            raise ValueError(f"l2p.pool_size {options.pool_size} gives {per_task} prompts per task for "
                             f"{len(task_names)} tasks; each task needs at least top_n={options.top_n}")
        self.owner = {name: list(range(i * per_task, (i + 1) * per_task)) for i, name in enumerate(task_names)}
        emb = model.get_input_embeddings().weight
        d, scale = emb.shape[1], float(emb.detach().float().std())
        # One parameter pair per task: the optimizer of task t holds only task t's share.
        # ParameterDict sorts the keys of a plain dict, so the pool is concatenated in stream
        # order (``owner``'s, see ``prompts``), never in the dicts' own order.
        self.prompt_sets = torch.nn.ParameterDict({
            n: torch.nn.Parameter(torch.randn(per_task, options.prompt_length, d, dtype=emb.dtype) * scale)
            for n in task_names})
        self.key_sets = torch.nn.ParameterDict({
            n: torch.nn.Parameter(torch.randn(per_task, d, dtype=emb.dtype)) for n in task_names})
        self.training_task: str | None = None
        self.last_selection: torch.Tensor | None = None
        self.surrogate: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        model.get_input_embeddings().register_forward_hook(self._swap)

    def _swap(self, module, args, out: torch.Tensor) -> torch.Tensor:
        if self._pending is None or out.shape[1] != self._pending[0].shape[1]:
            return out
        where, vectors = self._pending
        self._pending = None
        out = out.clone()
        out[where] = vectors.reshape(-1, out.shape[-1]).to(out.dtype)
        return out

    def query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
              query_mask: torch.Tensor | None = None) -> torch.Tensor:
        return pooled_query(self.base, input_ids, attention_mask, labels, query_mask)

    @property
    def prompts(self) -> torch.Tensor:
        """The pool in stream order: rows ``owner[task]`` are that task's prompts."""
        return torch.cat([self.prompt_sets[n] for n in self.owner])

    @property
    def keys(self) -> torch.Tensor:
        return torch.cat([self.key_sets[n] for n in self.owner])

    def select(self, q: torch.Tensor) -> torch.Tensor:
        return self.select_from(q, self.keys)

    def select_from(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        sims = q @ F.normalize(keys.float(), dim=-1).T
        if self.training_task is not None:  # only the training task's own prompts
            allowed = torch.full_like(sims, float("-inf"))
            allowed[:, self.owner[self.training_task]] = 0.0
            sims = sims + allowed
        return sims.topk(self.options.top_n, dim=-1).indices

    def _insert(self, input_ids, attention_mask, labels):
        b, t = input_ids.shape
        n = self.options.top_n * self.options.prompt_length
        first = attention_mask.long().argmax(1)  # each row's first real token (left or right padding)
        new_t = t + n
        col = torch.arange(new_t, device=input_ids.device).unsqueeze(0).expand(b, -1)
        is_prompt = (col >= first.unsqueeze(1)) & (col < first.unsqueeze(1) + n)
        src = col - n * (col >= first.unsqueeze(1) + n).long()  # original column of each kept position
        src = src.clamp(max=t - 1)

        def spread(x: torch.Tensor, fill: int) -> torch.Tensor:
            out = torch.gather(x, 1, src)
            return out.masked_fill(is_prompt, fill)

        ids = spread(input_ids, 0)  # placeholder ids: the embedding hook replaces them
        mask = spread(attention_mask, 1)
        lab = spread(labels, -100) if labels is not None else None
        return ids, mask, lab, is_prompt

    def _prepare(self, input_ids, attention_mask, labels, query_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        q = self.query(input_ids, attention_mask, labels, query_mask)
        keys_all = self.keys
        chosen = self.select_from(q, keys_all)
        self.last_selection = chosen.detach()
        keys = F.normalize(keys_all[chosen].float(), dim=-1)
        self.surrogate = (1 - (keys * q.unsqueeze(1)).sum(-1)).sum(-1).mean()
        ids, mask, lab, is_prompt = self._insert(input_ids, attention_mask, labels)
        self._pending = (is_prompt, self.prompts[chosen])
        return ids, mask, lab, is_prompt

    def forward(self, input_ids=None, attention_mask=None, labels=None, query_mask=None, **kwargs):
        ids, mask, lab, is_prompt = self._prepare(input_ids, attention_mask, labels, query_mask)
        out = self.base(input_ids=ids, attention_mask=mask, labels=lab, **kwargs)
        b, t = input_ids.shape
        out.logits = out.logits[~is_prompt].view(b, t, -1)  # callers index logits by their own columns
        return out

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        ids, mask, _, _ = self._prepare(input_ids, attention_mask, None)
        out = self.base.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return torch.cat([input_ids, out[:, ids.shape[1]:]], dim=1)


@register
class L2P(Strategy):
    name = "l2p"
    not_private = "its prompt keys are pulled toward private queries by a loss outside retain's per-example loss"
    data_parallel = ("its key-matching loss is a mean over the batch's queries, which the data-parallel "
                     "step does not weigh by the global batch")
    sharded = "its prompt pool wraps the model outside the sharded transformer"
    summary = "Learning to Prompt: a pool of keyed soft prompts chosen per input by the frozen model's query; base frozen"
    not_exportable = ("its soft prompts are chosen per input by key-query matching in a wrapper around the model, "
                      "which neither PEFT nor transformers can load")
    options_key = "l2p"
    Options = L2POptions
    owns_parameters = True
    freezes_earlier = True
    rewrites_input = True
    per_task_phases = True

    def check(self, config, stream) -> None:
        o, n = self.options, len(stream.tasks)
        if o.pool_size // n < o.top_n:
            raise ValueError(f"l2p.pool_size {o.pool_size} gives {o.pool_size // n} prompts per task for "
                             f"{n} tasks; each task needs at least top_n={o.top_n}")

    def setup(self, ctx: Context):
        for p in ctx.model.parameters():
            p.requires_grad = False
        self.pool = PromptPool(ctx.model, self.options, ctx.stream.task_names)
        return self.pool

    def _pool(self, ctx: Context) -> PromptPool:
        return ctx.accelerator.unwrap_model(ctx.model)

    def before_task(self, ctx: Context, tasks) -> None:
        # The flags are set here, not in trainable_parameters: strategies later in the stack
        # (lwf's teacher snapshot) read them in their own before_task.
        pool = self._pool(ctx)
        pool.training_task = task = tasks[0].name
        for name in pool.prompt_sets:
            pool.prompt_sets[name].requires_grad = pool.key_sets[name].requires_grad = name == task

    def trainable_parameters(self, ctx: Context):
        pool = self._pool(ctx)
        return [pool.prompt_sets[pool.training_task], pool.key_sets[pool.training_task]]

    def extra_loss(self, ctx: Context, batch, outputs, items):
        pool = self._pool(ctx)
        return self.options.key_weight * pool.surrogate if pool.surrogate is not None and self.options.key_weight else None

    def after_task(self, ctx: Context, tasks) -> None:
        self._pool(ctx).training_task = None

    def stats(self) -> dict:
        pool = getattr(self, "pool", None)
        if pool is None:
            return {}
        return {"prompts_per_task": len(next(iter(pool.owner.values()))),
                "parameters_per_task": pool.prompt_sets[next(iter(pool.prompt_sets))].numel()
                + pool.key_sets[next(iter(pool.key_sets))].numel()}
