"""The strategy plugin contract, the registry, and the stack that composes strategies.

A strategy overrides only the hooks it needs; every hook has a do-nothing default. The
loop calls the hooks through a ``StrategyStack``, so ``lora+replay`` is two plugins, not
a third class.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Iterator, Literal

import torch
from pydantic import BaseModel

from retain.parallel import Processes

if TYPE_CHECKING:
    from accelerate import Accelerator

    from retain.routing import TaskRouter

    from retain.config import RunConfig
    from retain.streams.task import Item, Stream, Task


#: ``evaluate(route, label) -> (task scores, probe score)``, see ``Strategy.finish``.
Evaluate = Callable[[Callable[[str | None], ContextManager], str], tuple[list[float], float | None]]


@dataclass
class Context:
    """What hooks may read. ``model`` is replaced only through the ``setup`` hook's return value."""

    config: "RunConfig"
    model: torch.nn.Module
    tokenizer: Any
    accelerator: "Accelerator"
    stream: "Stream"
    #: Where the run writes; None on every process but the main one of a data-parallel run
    #: (and outside a run), so that a strategy saving adapters writes one copy.
    run_dir: Path | None = None
    #: The phase being trained (set by the loop; -1 before the first).
    phase: int = -1
    #: The processes of a data-parallel run (one by default): shares of work and reductions.
    processes: Processes = field(default_factory=Processes)
    #: True while a resumed phase replays its batch draws up to the checkpoint's step: those
    #: batches never train, so a strategy's ``batches`` may skip model work for them (MIR's
    #: virtual steps), but must still make every RNG draw, so that it reaches the checkpoint's
    #: step in the same state.
    fast_forward: bool = False

    @property
    def phase_seed(self) -> int:
        """The seed of the current phase, the one the loop seeds its batch order with."""
        from retain.state import phase_seed

        return phase_seed(self.config.seed, self.phase)


#: Hooks the loop calls while a phase trains, which a strategy that takes over the step
#: (``step``) or the whole phase (``train_phase``) may leave uncalled.
TRAINING_HOOKS = ("trainable_parameters", "batches", "schedule", "step", "extra_loss", "train_phase")


class Strategy:
    """Base class of every method: all hooks are optional.

    What a strategy can be combined with follows from the hooks it overrides and the
    capabilities it declares below; ``parse_strategy`` refuses a combination in which a
    hook or a capability would go unused, naming both methods and the reason.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: Config section holding this strategy's options (``None``: no options).
    options_key: ClassVar[str | None] = None
    Options: ClassVar[type[BaseModel] | None] = None
    #: True for strategies that decide which weights train (naive, lora, ...); a stack has one.
    owns_parameters: ClassVar[bool] = False
    #: A strategy that overrides ``step`` or ``train_phase`` takes over the loop's gradient
    #: step or whole phase; these are the other strategies' training hooks it still calls.
    honours: ClassVar[frozenset[str]] = frozenset()
    #: Owners only: each task trains parameters of its own and earlier tasks' parameters
    #: are frozen (per-task adapters, prompt sets, experts).
    freezes_earlier: ClassVar[bool] = False
    #: Owners only: each task is scored through its own parameters (routing by task).
    scores_per_task: ClassVar[bool] = False
    #: Needs one task per phase (it keys adapters, memories or pseudo-data by ``tasks[0]``).
    per_task_phases: ClassVar[bool] = False
    #: Acts on what earlier tasks trained (anchors, masks, memories): useless in a single phase.
    acts_on_earlier: ClassVar[bool] = False
    #: Protects weights that earlier tasks trained (anchors, masks): pointless when the owner
    #: freezes those weights anyway.
    anchors_weights: ClassVar[bool] = False
    #: Keeps the model's outputs close to the model before the task (distillation): pointless
    #: when each task is scored through parameters of its own.
    distils_previous_model: ClassVar[bool] = False
    #: Wraps the model in a module that rewrites its input (soft prompts, routing on the whole
    #: sequence): scored option by option, and not handed to lm-eval.
    rewrites_input: ClassVar[bool] = False
    #: ``extra_loss`` reads the logits of every position (distillation against a teacher's):
    #: the loop then computes them all instead of only the columns that predict a target.
    reads_logits: ClassVar[bool] = False
    #: Relies on the loop's own AdamW step (gradient masks with weight decay 0).
    needs_loop_optimizer: ClassVar[bool] = False
    #: Why ``retain export`` cannot hand this method's model over as PEFT adapters or plain
    #: weights (empty: it can). ``retain serve`` serves every method as it runs.
    not_exportable: ClassVar[str] = ""
    #: Works without task boundaries (``online:`` mode): it neither keys state by task nor acts
    #: at a task's start or end in a way the method needs.
    task_free: ClassVar[bool] = False
    #: Under ``privacy:`` (DP-SGD): "" when DP-SGD covers all this method learns from private
    #: examples, else why not (a statistic of private examples taken outside the noised step, a
    #: loss term Opacus cannot split into per-example gradients, a step of its own). ``None``:
    #: not reviewed for privacy, so refused.
    not_private: ClassVar[str | None] = None
    #: In a data-parallel run (N processes): "" when the method gives the one-process result
    #: (its state identical on every process, or reduced across them), else why not. ``None``:
    #: not reviewed for data-parallel runs, so refused there.
    data_parallel: ClassVar[str | None] = None
    #: Under ``train.sharding`` (FSDP2: each process holds a shard of every weight): "" when the
    #: method gives the one-process result on sharded weights, else why not. ``None``: not
    #: reviewed for sharding, so refused there.
    sharded: ClassVar[str | None] = None
    #: Names of strategies this one cannot be combined with, with the reason.
    incompatible: ClassVar[dict[str, str]] = {}
    #: Names of strategies this one needs in the same stack (``merge`` needs ``lora-per-task``).
    requires: ClassVar[frozenset[str]] = frozenset()
    #: False: a kill inside a phase loses the phase (its training runs outside the loop).
    resumes_mid_phase: ClassVar[bool] = True

    @classmethod
    def overridden(cls) -> frozenset[str]:
        """The hooks this class (or a parent below ``Strategy``) implements."""
        return frozenset(h for h in HOOKS if getattr(cls, h) is not getattr(Strategy, h))

    @classmethod
    def takes_over(cls) -> Literal["step", "phase"] | None:
        hooks = cls.overridden()
        return "phase" if "train_phase" in hooks else "step" if "step" in hooks else None

    def __init__(self, options: BaseModel | None = None) -> None:
        # Strategies built outside a config (tests, notebooks) get their default options.
        self.options = options if options is not None or self.Options is None else self.Options()

    def check(self, config: "RunConfig", stream: "Stream") -> None:
        """Refuse (raise ValueError) what needs only the config and the stream, before the
        model loads: ``retain validate`` and ``retain run`` both call it."""

    def setup(self, ctx: Context) -> torch.nn.Module | None:
        """Once, before the base evaluation. Return a replacement model (e.g. a PEFT wrapper)."""
        return None

    def plan(self, tasks: list["Task"]) -> list[list["Task"]] | None:
        """Group tasks into training phases (``joint``: one phase of all tasks)."""
        return None

    def before_task(self, ctx: Context, tasks: list["Task"]) -> None:
        """Before a phase trains: add or switch adapters, snapshot a teacher."""

    def trainable_parameters(self, ctx: Context) -> list[torch.nn.Parameter] | None:
        """The parameters the optimizer updates in this phase (default: those requiring grad)."""
        return None

    def batches(self, ctx: Context, tasks: list["Task"], batches: Iterator[list["Item"]]) -> Iterator[list["Item"]]:
        """Change what the model sees (replay mixing)."""
        return batches

    def schedule(self, ctx: Context, optimizer: torch.optim.Optimizer, steps: int) -> Any | None:
        """A learning-rate scheduler for this phase (default: constant after ``train.warmup_steps``)."""
        return None

    def train_phase(self, ctx: Context, tasks: list["Task"], steps: int,
                    on_step: Callable[[float, int], None]) -> bool:
        """Train the whole phase yourself (e.g. with a TRL trainer), calling ``on_step(loss,
        tokens)`` after each of the ``steps`` updates; return True when done, False to leave
        the phase to the loop."""
        return False

    def step(self, ctx: Context, items: list["Item"]) -> tuple[float, int] | None:
        """Replace the gradient step on a batch (evolution strategies): update the weights and
        return (a loss to report, tokens processed); None keeps the loop's gradient step."""
        return None

    def extra_loss(self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any,
                   items: list["Item"]) -> torch.Tensor | None:
        """A term added to the language-modelling loss (EWC penalty, distillation).

        In a data-parallel run (``data_parallel == ""``) return this process's part of the
        term, so that the parts add up to the one-process term: ``ctx.processes.replicated(t)``
        for a term every process computes whole, ``ctx.processes.mean(total, count)`` for a mean
        over the batch (this process holds a share of it). Both are the term itself in one process."""
        return None

    def after_task(self, ctx: Context, tasks: list["Task"]) -> None:
        """After a phase trains, before it is evaluated: save adapters, fill memories."""

    def route(self, ctx: Context, task: str | None) -> ContextManager | None:
        """A context under which ``task`` is scored (``None``: the probe); None keeps the model as is."""
        return None

    def task_router(self) -> "TaskRouter | None":
        """Per-task methods: the router that picks a task for an unlabeled input (task-agnostic
        evaluation and ``retain generate`` without ``--task``)."""
        return None

    def finish(self, ctx: Context, evaluate: "Evaluate") -> dict[str, Any] | None:
        """After the last phase: extra evaluations (merged adapters), recorded in results.json
        under ``final`` -> this strategy's name. ``evaluate(route, label)`` scores every task
        and the probe with ``route(task)`` as the context for each."""
        return None

    def export(self, ctx: Context, run_dir: Path) -> None:
        """At the end of the stream: write artifacts a server can load."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state a resumed run needs (tensors go through the model checkpoint)."""
        return {}

    def load_state_dict(self, ctx: Context, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``, re-creating any model structure it describes."""

    def phase_state(self) -> dict[str, Any]:
        """State that changes while a phase trains and that replaying the phase's batch draws
        does not rebuild (ES's iterations, tf-ewc's detector and Fisher); saved at in-phase
        checkpoints: JSON in state.json, any tensors in it beside, in the optimizer file."""
        return {}

    def load_phase_state(self, ctx: Context, state: dict[str, Any]) -> None:
        """Restore ``phase_state()`` when a run resumes inside a phase."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors a resumed run needs besides the model's (Fisher, anchors, stored logits)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore ``state_tensors()``; called after ``load_state_dict``."""

    def stats(self) -> dict[str, Any]:
        """Figures about the phase just trained, recorded in results.json (``strategy_stats``)."""
        return {}

    def private_replay_rate(self, ctx: Context) -> float:
        """Under ``privacy:``: the per-step Poisson rate at which this phase replays each stored
        private example (0: it replays none); the accountant charges it to earlier tasks."""
        return 0.0


#: Every hook, in the order the loop meets them.
HOOKS = ("check", "setup", "plan", "before_task", "trainable_parameters", "batches", "schedule", "train_phase",
         "step", "extra_loss", "after_task", "route", "task_router", "finish", "export", "state_dict",
         "load_state_dict", "phase_state", "load_phase_state", "state_tensors", "load_state_tensors", "stats",
         "private_replay_rate")

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a 'name'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"strategy name '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Strategy]]:
    from retain.strategies import discover

    discover()
    return dict(_REGISTRY)


def option_models() -> dict[str, type[BaseModel]]:
    """Config sections of every registered strategy, by key."""
    return {cls.options_key: cls.Options for cls in registry().values() if cls.options_key and cls.Options}


def _hook_words(takes: str, name: str) -> str:
    return f"{name} replaces the gradient step" if takes == "step" else f"{name} trains each phase itself"


def refusal(a: type[Strategy], b: type[Strategy]) -> str | None:
    """Why ``a`` and ``b`` cannot run together (``None``: they can), from their hooks and
    declared capabilities; checked both ways round by ``parse_strategy``."""
    if b.name in a.incompatible:
        return f"{a.name} cannot be combined with {b.name}: {a.incompatible[b.name]}"
    takes = a.takes_over()
    if takes:
        if b.takes_over():
            return f"{a.name} and {b.name} both take over training; keep one"
        dropped = sorted((b.overridden() & set(TRAINING_HOOKS)) - a.honours)
        if dropped:
            return f"{_hook_words(takes, a.name)}, so {b.name}'s {dropped[0]} would never run"
        if b.needs_loop_optimizer:
            return (f"{_hook_words(takes, a.name)}, so {b.name}, which works through the loop's "
                    "optimizer step, would never act")
    if "plan" in a.overridden() and (b.per_task_phases or b.acts_on_earlier):
        return (f"{a.name} trains every task in one phase, so {b.name}, which works task by task, "
                "would never act")
    if a.freezes_earlier and b.anchors_weights:
        return (f"{a.name} trains new parameters for each task and freezes earlier ones, so {b.name}, "
                "which protects the weights earlier tasks trained, would never act")
    if a.scores_per_task and b.distils_previous_model:
        return (f"{a.name} scores each task through its own parameters, so {b.name}'s distillation "
                "would only pull the new task's parameters toward the base model")
    return None


def parse_strategy(spec: str) -> list[type[Strategy]]:
    """Classes named by ``a+b+c``, with ``naive`` added when none decides which weights train.

    Refuses, before anything runs, a combination in which some method would not do what
    its name says (see ``refusal``)."""
    known = registry()
    names = [part.strip() for part in spec.split("+")]
    if not all(names):
        raise ValueError(f"strategy '{spec}' has an empty part; join names with '+', e.g. lora+replay")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown strategy '{unknown[0]}'; valid: {', '.join(sorted(known))}")
    if len(set(names)) != len(names):
        raise ValueError(f"strategy '{spec}' names a method twice")
    classes = [known[n] for n in names]
    owners = [c.name for c in classes if c.owns_parameters]
    if len(owners) > 1:
        raise ValueError(f"strategies {' and '.join(owners)} both decide which weights train; keep one")
    for c in classes:
        missing = c.requires - set(names)
        if missing:
            need = sorted(missing)[0]
            raise ValueError(f"strategy '{c.name}' needs '{need}' in the same run, e.g. {need}+{c.name}")
    if not owners:
        classes.insert(0, known["naive"])
    for a in classes:
        for b in classes:
            reason = refusal(a, b) if a is not b else None
            if reason:
                raise ValueError(f"strategy '{spec}': {reason}")
    classes.sort(key=lambda c: not c.owns_parameters)
    return classes


def combinations() -> list[str]:
    """Every allowed stack of one owner and at most one other method, by name (the contract
    test's table)."""
    known = registry()
    owners = sorted(n for n, c in known.items() if c.owns_parameters)
    others = sorted(n for n, c in known.items() if not c.owns_parameters)
    specs = owners + [f"{o}+{x}" for o in owners for x in others]
    allowed = []
    for spec in specs:
        try:
            parse_strategy(spec)
        except ValueError:
            continue
        allowed.append(spec)
    return allowed


class StrategyStack:
    """Calls each hook of several strategies in order and combines what they return."""

    def __init__(self, strategies: list[Strategy]) -> None:
        self.strategies = strategies

    @classmethod
    def from_config(cls, config: "RunConfig") -> "StrategyStack":
        built = []
        for klass in parse_strategy(config.strategy):
            options = config.options(klass.options_key) if klass.options_key else None
            built.append(klass(options))
        return cls(built)

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.strategies)

    @property
    def resumes_mid_phase(self) -> bool:
        """Whether a checkpoint inside a phase can be resumed exactly (not when a phase runs
        outside the loop, e.g. in TRL's trainer)."""
        return all(s.resumes_mid_phase for s in self.strategies)

    @property
    def reads_all_logits(self) -> bool:
        """Whether the training step must compute every position's logits (a strategy reads them)."""
        return any(s.reads_logits for s in self.strategies)

    @property
    def takes_over_phase(self) -> bool:
        return any(s.takes_over() == "phase" for s in self.strategies)

    @property
    def takes_over_step(self) -> bool:
        return any(s.takes_over() == "step" for s in self.strategies)

    def check(self, config: "RunConfig", stream: "Stream") -> None:
        for s in self.strategies:
            s.check(config, stream)

    def setup(self, ctx: Context) -> torch.nn.Module:
        for s in self.strategies:
            replaced = s.setup(ctx)
            if replaced is not None:
                ctx.model = replaced
        return ctx.model

    def plan(self, tasks: list["Task"]) -> list[list["Task"]]:
        for s in self.strategies:
            phases = s.plan(tasks)
            if phases is not None:
                return phases
        return [[t] for t in tasks]

    def before_task(self, ctx: Context, tasks: list["Task"]) -> None:
        for s in self.strategies:
            s.before_task(ctx, tasks)

    def trainable_parameters(self, ctx: Context) -> list[torch.nn.Parameter]:
        for s in self.strategies:
            params = s.trainable_parameters(ctx)
            if params is not None:
                return params
        return [p for p in ctx.model.parameters() if p.requires_grad]

    def batches(self, ctx: Context, tasks: list["Task"], batches: Iterator[list["Item"]]) -> Iterator[list["Item"]]:
        for s in self.strategies:
            batches = s.batches(ctx, tasks, batches)
        return batches

    def schedule(self, ctx: Context, optimizer: torch.optim.Optimizer, steps: int) -> Any | None:
        for s in self.strategies:
            scheduler = s.schedule(ctx, optimizer, steps)
            if scheduler is not None:
                return scheduler
        return None

    def train_phase(self, ctx: Context, tasks: list["Task"], steps: int,
                    on_step: Callable[[float, int], None]) -> bool:
        return any(s.train_phase(ctx, tasks, steps, on_step) for s in self.strategies)

    def step(self, ctx: Context, items: list["Item"]) -> tuple[float, int] | None:
        for s in self.strategies:
            result = s.step(ctx, items)
            if result is not None:
                return result
        return None

    def extra_loss(self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any,
                   items: list["Item"]) -> torch.Tensor | None:
        terms = [t for t in (s.extra_loss(ctx, batch, outputs, items) for s in self.strategies) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_task(self, ctx: Context, tasks: list["Task"]) -> None:
        for s in self.strategies:
            s.after_task(ctx, tasks)

    def route(self, ctx: Context, task: str | None) -> ContextManager:
        for s in self.strategies:
            cm = s.route(ctx, task)
            if cm is not None:
                return cm
        return contextlib.nullcontext()

    def task_router(self) -> "TaskRouter | None":
        return next((r for s in self.strategies if (r := s.task_router()) is not None), None)

    def finish(self, ctx: Context, evaluate: Evaluate) -> dict[str, Any]:
        return {s.name: out for s in self.strategies if (out := s.finish(ctx, evaluate))}

    def export(self, ctx: Context, run_dir: Path) -> None:
        for s in self.strategies:
            s.export(ctx, run_dir)

    def state_dict(self) -> dict[str, Any]:
        return {s.name: s.state_dict() for s in self.strategies}

    def load_state_dict(self, ctx: Context, state: dict[str, Any]) -> None:
        for s in self.strategies:
            s.load_state_dict(ctx, state.get(s.name, {}))

    def phase_state(self) -> dict[str, Any]:
        return {s.name: st for s in self.strategies if (st := s.phase_state())}

    def load_phase_state(self, ctx: Context, state: dict[str, Any]) -> None:
        for s in self.strategies:
            if s.name in state:
                s.load_phase_state(ctx, state[s.name])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{s.name}/{k}": v for s in self.strategies for k, v in s.state_tensors().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for s in self.strategies:
            prefix = f"{s.name}/"
            s.load_state_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def stats(self) -> dict[str, Any]:
        return {s.name: st for s in self.strategies if (st := s.stats())}

    def private_replay_rate(self, ctx: Context) -> float:
        return min(1.0, sum(s.private_replay_rate(ctx) for s in self.strategies))
