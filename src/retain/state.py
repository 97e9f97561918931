"""The run's state: what the loop has done so far, and the checkpoint format (state.json).

One typed record instead of a dict that gains keys as the run goes: every field a
resumed run reads is declared here, with its meaning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from retain.errors import RetainError


def phase_seed(seed: int, phase: int) -> int:
    """The seed of one phase: its batch order, its LoRA initialization, its Fisher samples."""
    return seed * 1000 + phase


@dataclass
class Progress:
    """A checkpoint inside a phase: how far it trained, and the files that hold the rest."""

    phase: int
    losses: list[float]
    tokens: int
    seconds: float
    #: ``phase_state()`` of each strategy (what replaying the batch draws does not rebuild).
    strategy: dict[str, Any] = field(default_factory=dict)
    #: The phase's trainable tensors at this step (checkpoint folder file name).
    tensors: str | None = None
    #: Optimizer, scheduler and RNG states (checkpoint folder file name); none for ES.
    optimizer: str | None = None

    @property
    def step(self) -> int:
        return len(self.losses)


@dataclass
class RunState:
    completed_phases: int = 0
    #: Scores of the base model on each task, and on the probe.
    base: list[float] | None = None
    base_probe: float | None = None
    #: R[i]: every task's score after phase i; probe[i]: the probe's.
    R: list[list[float]] = field(default_factory=list)
    probe: list[float | None] = field(default_factory=list)
    #: Every evaluation (base, then one per phase): each task's score, its standard error,
    #: items scored, and every score computed (acc and acc_norm for choice tasks).
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    phases: list[list[str]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    #: Parameters trainable in some phase: the tensors a checkpoint saves.
    trained_keys: list[str] = field(default_factory=list)
    #: Each strategy's ``state_dict()`` as of the last completed phase.
    strategy: dict[str, Any] = field(default_factory=dict)
    strategy_stats: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    peak_memory_mb: float = 0.0
    wall_s: float = 0.0
    routing: dict[str, Any] | None = None
    final: dict[str, Any] | None = None
    #: Online mode: the anytime-evaluation curve, prequential scores, hidden boundaries.
    online: dict[str, Any] | None = None
    #: Federated runs: the clients' strategy state, their own scores, each phase's rounds.
    federated: dict[str, Any] | None = None
    #: The membership-inference check (``eval.membership``): "base" and "final" AUCs.
    membership: dict[str, Any] | None = None
    #: Processes of the (last) process group that ran it: 1, or N in a data-parallel run.
    num_processes: int = 1
    #: "zero2" / "zero3" when the weights were sharded over the processes (train.sharding).
    sharding: str | None = None
    progress: Progress | None = None
    #: Checkpoint files this state goes with ("trained", "strategy"), by role.
    files: dict[str, str] = field(default_factory=dict)
    #: Incremented by every checkpoint: names its files, so a new checkpoint never
    #: overwrites the files the previous state.json points to.
    serial: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "state.json") -> "RunState":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RetainError(f"{source}: unknown checkpoint key '{unknown[0]}' (written by another retain version?)")
        data = dict(data)
        progress = data.pop("progress", None)
        try:
            state = cls(**data)
            state.progress = Progress(**progress) if progress else None
        except TypeError as exc:
            raise RetainError(f"{source}: corrupt checkpoint state ({exc})") from None
        return state
