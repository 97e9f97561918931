"""Differentially private training of a stream: DP-SGD through Opacus, and its accounting.

Opacus does the private parts: per-example gradients (``GradSampleModule``), clipping and
noise (``DPOptimizer``), Poisson sampling (``UniformWithReplacementSampler``) and the privacy
accountants (RDP, PRV). What a stream adds, and this module does:

- each phase draws Poisson batches of its own examples at rate ``batch_size / N`` and gets
  the noise multiplier that spends ``privacy.epsilon`` on them over the phase's steps;
- a memory that replays earlier tasks' examples (``replay``) draws them by Poisson sampling
  too, so each replayed example's privacy loss is a subsampled Gaussian the accountant can
  compose: an example of task j spends budget in its own phase and again in every later
  phase that can replay it. results.json reports each task's total and the stream's (the
  largest), which exceeds the per-phase target whenever a memory replays private data.

The loss each example contributes is its own mean token loss (not the batch's token mean,
which would tie one example's gradient to the lengths of the others).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

import torch

from retain.errors import RetainError
from retain.streams.task import Item

if TYPE_CHECKING:
    from retain.config import PrivacyConfig, RunConfig
    from retain.strategies import StrategyStack
    from retain.streams import Stream

#: What DP-SGD needs on top of the base install.
EXTRA = "pip install 'retain[privacy]'"


def require_opacus() -> None:
    if importlib.util.find_spec("opacus") is None:
        raise RetainError(f"privacy: DP-SGD runs on Opacus, which is not installed ({EXTRA})")


def check(config: "RunConfig", stream: "Stream", stack: "StrategyStack") -> None:
    """Refuse, before the model loads, a run whose privacy accounting would not hold."""
    p = config.privacy
    require_opacus()
    if config.online is not None:
        raise RetainError("privacy: online mode presents each example once in stream order, and the accountant "
                          "here assumes Poisson sampling of a phase's examples; train with task boundaries")
    if config.train.precision == "fp16":
        raise RetainError("privacy: train.precision fp16 scales the loss, and Opacus clips per-example gradients "
                          "before any unscaling; use bf16 or no")
    for s in stack.strategies:
        if s.not_private is None:
            raise RetainError(f"privacy: strategy '{s.name}' is not covered by DP-SGD here; "
                              f"covered: {', '.join(private_strategies())}")
        if s.not_private:
            raise RetainError(f"privacy: strategy '{s.name}' cannot train privately: {s.not_private}; "
                              f"covered: {', '.join(private_strategies())}")
    for task in stream.tasks:
        n = len(task.train)
        if n and p.delta >= 1 / n:
            raise RetainError(f"privacy.delta {p.delta:g} is not below 1/N = 1/{n} for task '{task.name}': a delta "
                              f"that large allows releasing an example outright; use e.g. {min(1e-5, 0.1 / n):g}")


def private_strategies() -> list[str]:
    from retain.strategies import registry

    return sorted(n for n, c in registry().items() if c.not_private == "")


@dataclass
class PhasePlan:
    """One phase under DP-SGD: its noise and the sampling rates of its own and replayed examples."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    examples: int
    #: Per-step Poisson rate of each memory record (0: nothing replayed in this phase).
    memory_rate: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps,
                "examples": self.examples, "memory_sample_rate": self.memory_rate}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PhasePlan":
        return cls(d["noise_multiplier"], d["sample_rate"], d["steps"], d["examples"], d["memory_sample_rate"])


def noise_for(p: "PrivacyConfig", sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends ``p.epsilon`` in ``steps`` steps at ``sample_rate`` (or the fixed one)."""
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=p.epsilon, target_delta=p.delta, sample_rate=sample_rate,
                                      steps=steps, accountant=p.accountant))


def epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of a composition of subsampled Gaussian steps (noise, rate, steps), by Opacus's accountant."""
    from opacus.accountants import create_accountant

    history = [h for h in history if h[1] > 0 and h[2] > 0]
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def poisson_batches(items: list[Item], sample_rate: float, steps: int, seed: int) -> Iterator[list[Item]]:
    """Each step, every example independently with probability ``sample_rate`` (batches vary
    in size and may be empty); Opacus's sampler, seeded by the phase."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    generator = torch.Generator().manual_seed(seed)
    sampler = UniformWithReplacementSampler(num_samples=len(items), sample_rate=sample_rate, generator=generator,
                                            steps=steps)
    while True:  # the loop takes as many batches as it has steps; a resumed phase skips some first
        for indices in sampler:
            yield [items[i] for i in indices]


def poisson_draw(records: list[Any], rate: float, rng) -> list[Any]:
    """A Poisson sample of a memory: each record with probability ``rate`` (``rng``: random.Random)."""
    return [r for r in records if rng.random() < rate]


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean token loss over its labelled positions (0 for a row without labels)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    mask = shift_labels != -100
    tokens = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                               shift_labels.clamp(min=0).reshape(-1), reduction="none")
    tokens = tokens.view(shift_labels.shape) * mask
    return tokens.sum(1) / mask.sum(1).clamp(min=1)


class PrivateTraining:
    """DP-SGD for one run: a phase's optimizer and step, and the accounting over phases."""

    def __init__(self, config: "RunConfig") -> None:
        self.config = config
        self.p = config.privacy
        self._module = None

    # -- a phase -------------------------------------------------------------------
    def plan_phase(self, examples: int, steps: int, memory_rate: float) -> PhasePlan:
        rate = min(1.0, self.config.train.batch_size / max(examples, 1))
        return PhasePlan(noise_for(self.p, rate, steps), rate, steps, examples, memory_rate)

    def begin(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: PhasePlan):
        """Attach per-example gradients to ``model`` and wrap ``optimizer`` in Opacus's DP optimizer."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        # strict=False: layers without an Opacus grad sampler (RMSNorm) fall back to functorch.
        self._module = GradSampleModule(model, loss_reduction="mean", strict=False)
        expected = max(1, round(plan.sample_rate * plan.examples))
        return DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=self.p.max_grad_norm,
                           expected_batch_size=expected, loss_reduction="mean")

    def end(self) -> None:
        """Remove the per-example hooks: evaluation and later phases see the plain model."""
        if self._module is not None:
            self._module._close()
            self._module = None

    def step(self, batch: dict[str, torch.Tensor] | None, params: list[torch.nn.Parameter],
             optimizer, autocast: Callable[[], ContextManager]) -> torch.Tensor | None:
        """Per-example gradients of the batch (``None``: an empty Poisson batch, which still takes a
        noised step), clipped and noised by ``optimizer``. Returns the batch's mean loss."""
        loss = None
        if batch is None:
            for p in params:  # nothing sampled: the step is noise alone, as the accountant assumes
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        else:
            with autocast():
                outputs = self._module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                loss = per_example_loss(outputs.logits, batch["labels"]).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # -- accounting ----------------------------------------------------------------
    def summary(self, timings: list[dict[str, Any]]) -> dict[str, Any]:
        """Privacy spent, from the phases' records (``timings[i]["privacy"]``, so a resumed run
        accounts what every process trained): each phase on its own examples, each task's
        examples over the stream (its own phase, then every later phase that replays memory),
        and the stream's total (the largest)."""
        p = self.p
        plans = [PhasePlan.from_dict(t["privacy"]) for t in timings]
        own = [epsilon([(pl.noise_multiplier, pl.sample_rate, pl.steps)], p.delta, p.accountant) for pl in plans]
        per_task: dict[str, float] = {}
        replayed: dict[str, int] = {}
        for i, (plan, timing) in enumerate(zip(plans, timings)):
            tasks = timing["tasks"]
            later = [(pl.noise_multiplier, pl.memory_rate, pl.steps) for pl in plans[i + 1:] if pl.memory_rate]
            total = epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps), *later], p.delta, p.accountant)
            for t in tasks:
                per_task[t] = round(total, 4)
                replayed[t] = len(later)
        out = {
            "accountant": p.accountant, "delta": p.delta, "max_grad_norm": p.max_grad_norm,
            "target_epsilon": p.epsilon, "noise_multiplier": p.noise_multiplier,
            "phases": [{**pl.to_dict(), "epsilon": round(e, 4)} for pl, e in zip(plans, own)],
            "task_epsilon": per_task,
            "epsilon": round(max(per_task.values()), 4) if per_task else 0.0,
        }
        if any(replayed.values()):
            out["note"] = ("a memory replayed private examples in later phases, each replay spending budget "
                           "again: " + ", ".join(f"{t} in {n} later phase(s)" for t, n in replayed.items() if n)
                           + "; task_epsilon composes each task's own phase with those replays")
        return out
