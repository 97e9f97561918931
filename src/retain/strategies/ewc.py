"""Elastic Weight Consolidation: a quadratic pull toward earlier tasks' weights, weighted by
how much each weight mattered to them (the diagonal Fisher information).

penalty = (lambda / 2) * sum_tasks sum_i F_i (theta_i - theta*_i)^2 over trainable weights.
``online: true`` keeps one running Fisher (F <- gamma * F + F_new) and one anchor (the
weights after the latest task): memory stays one Fisher and one anchor whatever the
number of tasks.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel, ConfigDict, Field

from retain import sharding
from retain.parallel import Processes
from retain.strategies._importance import diagonal_fisher, named_trainable
from retain.strategies.base import Context, Strategy, register


def fisher_mean(fisher: dict[str, torch.Tensor], processes: Processes) -> float:
    """The mean Fisher entry over all weights (sharded: over every process's shards)."""
    if processes.sharded:
        total, count = processes.sum(float(sum(sharding.local(f).sum() for f in fisher.values())),
                                     float(sum(sharding.local(f).numel() for f in fisher.values())))
        return total / max(count, 1.0)
    return float(sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values()))


class EWCOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # Scale-dependent: the Fisher here is of the summed target log-likelihood; on SmolLM2-135M
    # its entries sum to ~3e4, so lambda ~100 makes the penalty comparable to the LM loss.
    lambda_: float = Field(default=100.0, ge=0, alias="lambda", description="penalty strength")
    fisher_samples: int = Field(default=32, ge=1, description="examples per Fisher estimate")
    online: bool = False
    gamma: float = Field(default=1.0, gt=0, le=1, description="decay of the running Fisher (online)")
    # A task fit to near-zero loss has vanishing target gradients, so its raw Fisher can be
    # ~1e-14 and no fixed lambda fits every task; normalized, each estimate has mean 1.
    normalize: bool = Field(default=False, description="divide each Fisher estimate by its mean")


@register
class EWC(Strategy):
    name = "ewc"
    not_private = ("its Fisher information is estimated from private examples outside the noised step, and its penalty "
                   "is not a per-example loss, so DP-SGD would drop its gradient")
    data_parallel = ""  # Fisher: a share of the samples per process, summed; penalty: 1/N per process
    sharded = ""  # Fisher, anchors and penalty by shard: each process's penalty covers its shard
    summary = "Elastic Weight Consolidation (diagonal Fisher; `online: true` keeps one decayed running Fisher)"
    options_key = "ewc"
    Options = EWCOptions
    acts_on_earlier = True
    anchors_weights = True

    def __init__(self, options: EWCOptions | None = None) -> None:
        super().__init__(options)
        # One (fisher, anchor) pair per task, or a single running pair when online.
        self.terms: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self._stats: dict = {}

    def penalty(self, params: dict[str, torch.nn.Parameter]) -> torch.Tensor | None:
        """The penalty on ``params``; on sharded weights this process's part of it (its shards')."""
        total = None
        for fisher, anchor in self.terms:
            for name, p in params.items():
                if name in fisher:
                    f, a, w = (sharding.local(t) for t in (fisher[name], anchor[name], p))
                    term = (f * (w - a) ** 2).sum()
                    total = term if total is None else total + term
        return None if total is None else 0.5 * self.options.lambda_ * total

    def extra_loss(self, ctx: Context, batch, outputs, items):
        if not self.terms or self.options.lambda_ == 0:
            return None
        penalty = self.penalty(named_trainable(ctx.model))
        if penalty is None or ctx.processes.sharded:  # sharded: the parts over processes add up to the penalty
            return penalty
        return ctx.processes.replicated(penalty)

    def after_task(self, ctx: Context, tasks) -> None:
        start = time.perf_counter()
        params = named_trainable(ctx.model)
        items = [it for t in tasks for it in t.items(ctx.tokenizer)]
        fisher = diagonal_fisher(ctx.model, ctx.tokenizer, items, params, self.options.fisher_samples,
                                 ctx.config.train.max_length, seed=ctx.phase_seed, processes=ctx.processes)
        if self.options.normalize:
            mean = max(fisher_mean(fisher, ctx.processes), torch.finfo(torch.float32).tiny)
            fisher = {k: v / mean for k, v in fisher.items()}
        anchor = {k: p.detach().clone() for k, p in params.items()}
        if self.options.online and self.terms:
            old, _ = self.terms[0]
            fisher = {k: self.options.gamma * old[k] + v for k, v in fisher.items()}
            self.terms = [(fisher, anchor)]
        else:
            self.terms.append((fisher, anchor))
        self._stats = {"fisher_s": round(time.perf_counter() - start, 3),
                       "fisher_mean": fisher_mean(fisher, ctx.processes)}

    def stats(self) -> dict:
        return self._stats

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for t, (fisher, anchor) in enumerate(self.terms):
            out.update({f"{t}/fisher/{k}": v for k, v in fisher.items()})
            out.update({f"{t}/anchor/{k}": v for k, v in anchor.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        count = 1 + max((int(k.split("/", 1)[0]) for k in tensors), default=-1)
        self.terms = []
        for t in range(count):
            pick = lambda kind: {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{t}/{kind}/")}  # noqa: E731
            self.terms.append((pick("fisher"), pick("anchor")))
