"""Evolution strategies: the weights move by reward-weighted noise instead of gradients.

Each training step is one ES iteration on the batch's prompts: draw N member seeds; for
each, perturb the trainable weights in place by sigma * noise, score the greedy answers
(exact answer, plus ``format_weight`` for the expected format), restore the weights
exactly; z-score the rewards; add (alpha / N) * sum z * noise, regenerated tensor by
tensor. With ``lora`` in the stack (``lora+es``) only the adapter weights move.
Defaults follow the evolution-strategies fine-tuning literature: N=30, sigma=1e-3,
alpha=5e-4.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Literal
from contextlib import closing

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from retain.evaluation.scoring import eval_mode, generate
from retain.rewards import FormatPattern, RewardKind, score
from retain.strategies.base import Context, Strategy, register
from retain.strategies.es.noise import apply_update, perturbed_members, unique_parameters, zscore
from retain.strategies.es.pools import WorkerPool, gather, shard
from retain.streams.task import Item

log = logging.getLogger(__name__)


class ESOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    population: int = Field(default=30, ge=2, description="members per iteration (N)")
    sigma: float = Field(default=1e-3, gt=0, description="perturbation scale")
    alpha: float = Field(default=5e-4, gt=0, description="step size")
    antithetic: bool = Field(default=False, description="members in +/- pairs sharing a seed (N even)")
    reward: RewardKind = Field(default="exact", description="exact gold answer, or a valid Countdown equation")
    format_weight: float = Field(default=0.1, ge=0, description="reward for the expected answer format")
    format_pattern: FormatPattern = Field(default=None, description="regex the answer's first line must match "
                                       "(default: as many words as the gold answer)")
    max_new_tokens: int = Field(default=16, ge=1)
    top_fraction: float | None = Field(default=None, gt=0, le=1, description="apply only this fraction of "
                                       "each tensor's update coordinates (largest first)")
    anchor_decay: float = Field(default=0.0, ge=0, lt=1, description="pull toward the base weights per iteration")
    workers: int = Field(default=1, ge=1, description="processes scoring the population (CPU; same results)")
    backend: Literal["processes", "ray"] = Field(default="processes", description="forked processes on this "
                                                  "machine, or Ray actors (a Ray cluster with ray_address)")
    ray_address: str | None = Field(default=None, description="Ray cluster address (none: a local Ray)")

    @model_validator(mode="after")
    def _even(self) -> "ESOptions":
        if self.antithetic and self.population % 2:
            raise ValueError(f"antithetic pairs need an even population, got {self.population}")
        return self


@register
class ES(Strategy):
    name = "es"
    not_private = "it replaces the gradient step with evolution strategies, which DP-SGD does not noise"
    data_parallel = ""  # members w, w+N, ... scored on process w, rewards gathered
    sharded = "its population perturbs and restores whole weights in place between forwards"
    summary = "evolution strategies: seeded in-place perturbations, z-scored rewards, no gradients"
    options_key = "es"
    Options = ESOptions
    # An ES iteration perturbs the weights the owner made trainable and scores the loop's
    # batches (replay mixing included); extra losses and schedules act through gradients and
    # the optimizer, which an ES step does not use, so stacks with them are refused.
    honours = frozenset({"trainable_parameters", "batches"})

    def __init__(self, options: ESOptions | None = None) -> None:
        super().__init__(options)
        self.anchor: dict[str, torch.Tensor] | None = None
        self._iterations: list[dict] = []
        self._phase: int | None = None  # the phase _iterations belong to
        self.pool: WorkerPool | None = None

    def check(self, config, stream) -> None:
        bad = [t.name for t in stream.tasks if t.metric == "perplexity"]
        if bad:
            raise ValueError(f"es needs tasks with answers to reward; '{bad[0]}' is scored by perplexity")

    def setup(self, ctx: Context) -> None:
        if self.options.anchor_decay:
            # The base weights to decay toward: one extra copy of the trainable weights.
            self.anchor = {n: p.detach().clone() for n, p in self.params(ctx)}
        return None

    def params(self, ctx: Context) -> list[tuple[str, torch.nn.Parameter]]:
        """The weights an iteration perturbs and updates: the trainable ones, each storage once."""
        return unique_parameters([(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad])

    def before_task(self, ctx: Context, tasks) -> None:
        if self._phase != ctx.phase:  # a run resumed inside this phase keeps its iterations
            self._iterations, self._phase = [], ctx.phase

    def state_dict(self) -> dict:
        return {"phase": self._phase, "iterations": self._iterations}

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        self._phase, self._iterations = state.get("phase"), list(state.get("iterations", []))

    # An iteration's members derive from the iterations done, and the update lives in the
    # weights: the iterations are all a checkpoint inside a phase needs.
    phase_state = state_dict

    def load_phase_state(self, ctx: Context, state: dict) -> None:
        self.load_state_dict(ctx, state)

    def after_task(self, ctx: Context, tasks) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def update(self, params, members, z) -> int:
        """Apply one iteration's update (the pools' workers call it too); returns entries changed."""
        o = self.options
        return apply_update(params, members, z, o.alpha, o.top_fraction, self.anchor, o.anchor_decay)

    def population_rewards(self, ctx: Context, items: list[Item], members: list[tuple[int, int]],
                           params) -> tuple[list[float], int]:
        """Mean reward of each member on ``items``; also the most restore fixes held at once."""
        o, model = self.options, ctx.model
        prompts = [it.prompt for it in items]
        rewards, most_fixes = [], 0
        # closing(): an error while scoring restores the weights at once, not when the traceback goes.
        with closing(perturbed_members(params, members, o.sigma)) as each:
            for perturbed in each:
                most_fixes = max(most_fixes, perturbed.fixed_entries)
                answers = generate(model, ctx.tokenizer, prompts, o.max_new_tokens, ctx.config.eval.batch_size)
                rewards.append(sum(score(o.reward, a, it.prompt, it.target, o.format_weight, o.format_pattern)
                                   for a, it in zip(answers, items)) / len(items))
        return rewards, most_fixes

    def members(self, ctx: Context) -> list[tuple[int, int]]:
        """(seed, sign) of each member, drawn from the run seed, the phase and the iteration."""
        rng = random.Random(f"{ctx.config.seed}/{ctx.phase}/{len(self._iterations)}")
        o = self.options
        if o.antithetic:
            seeds = [rng.getrandbits(62) for _ in range(o.population // 2)]
            return [(s, sign) for s in seeds for sign in (1, -1)]
        return [(rng.getrandbits(62), 1) for _ in range(o.population)]

    def step(self, ctx: Context, items: list[Item]) -> tuple[float, int]:
        start = time.perf_counter()
        model, params, o = ctx.model, self.params(ctx), self.options
        with eval_mode(model):
            members = self.members(ctx)
            # CUDA cannot be forked, and one member's generation already fills the GPU.
            forked_on_gpu = o.backend == "processes" and params[0][1].is_cuda
            if o.workers > 1 and forked_on_gpu and not self._iterations:
                log.warning("es.workers=%d ignored on a GPU: the population is scored serially", o.workers)
            if o.workers > 1 and self.pool is None and not forked_on_gpu:
                # Started now, at the phase's first iteration: the workers hold this phase's weights.
                if o.backend == "ray":
                    from retain.strategies.es.pools import RayPool

                    self.pool = RayPool(o.workers, ctx.config.resolved(), params, o.ray_address)
                else:
                    self.pool = WorkerPool(o.workers, lambda its, ms: self.population_rewards(ctx, its, ms, params),
                                           lambda ms, zs: self.update(params, ms, zs))
            if self.pool is not None:
                rewards, fixes = self.pool.score(items, members)
            elif ctx.processes.count > 1:
                # A data-parallel run: this process scores its members by the pools' sharding rule.
                n, rank = ctx.processes.count, ctx.processes.rank
                share = self.population_rewards(ctx, items, shard(members, n)[rank], params)
                rewards, fixes = gather(ctx.processes.gather([share]), len(members))
            else:
                rewards, fixes = self.population_rewards(ctx, items, members, params)
            z = zscore(rewards)
            if self.pool is not None:
                self.pool.update(members, z)
            changed = self.update(params, members, z)
        mean = sum(rewards) / len(rewards)
        self._iterations.append({"reward_mean": mean, "reward_max": max(rewards), "changed": changed,
                                 "restore_fixes": fixes, "seconds": time.perf_counter() - start})
        tokens = sum(len(ctx.tokenizer(it.prompt)["input_ids"]) for it in items) * len(members)
        return -mean, tokens

    def stats(self) -> dict:
        its = self._iterations
        if not its:
            return {}
        return {
            "iterations": len(its),
            "reward_first": round(its[0]["reward_mean"], 4),
            "reward_last": round(its[-1]["reward_mean"], 4),
            "flat_iterations": sum(1 for i in its if i["changed"] == 0),
            "changed_last": its[-1]["changed"],
            "restore_fixes_max": max(i["restore_fixes"] for i in its),
            "seconds_per_iteration": round(sum(i["seconds"] for i in its) / len(its), 3),
        }
