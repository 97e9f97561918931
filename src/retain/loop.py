"""The one training and evaluation loop, read top to bottom.

    load model and stream -> strategy.setup -> score base model (b)
    for each phase (a task, or all tasks for joint):
        strategy.before_task
        for step in range(max_steps * len(phase)):     (checkpoint every train.checkpoint_every)
            batch <- strategy.batches(...)           (replay mixing)
            loss = LM loss + strategy.extra_loss     (EWC, distillation)
            backward, clip, optimizer step
        strategy.after_task                          (save adapters, fill memory)
        score every task and the probe -> a row of R
        checkpoint
    strategy.export -> results.json -> report
"""

from __future__ import annotations

import logging
import math
import random
import resource
import shutil
import time
from itertools import islice
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from transformers import get_scheduler

from retain import checkpoint, parallel, sharding
from retain.analysis import UpdateTracker
from retain.config import RunConfig, read_yaml, validate_config
from retain.errors import RetainError
from retain.batching import batch_stream, collate, token_lengths
from retain.evaluation.scoring import evaluate_task, work_units
from retain.evaluation.uncertainty import item_record
from retain.io import atomic_write_text
from retain.lm_loss import lm_outputs
from retain.models import load_model
from retain.routing import agnostic_evaluation
from retain.state import Progress, RunState, phase_seed
from retain.streams import Stream, Task, build_stream
from retain.strategies import Context, StrategyStack, registry
from retain.analysis.cost import matmul_parameters, phase_cost
from retain.online import OnlineRun
from retain.privacy import PrivateTraining, poisson_batches
from retain.tracking import Tracking
from retain.ui import UI

log = logging.getLogger(__name__)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Run:
    """A run directory being filled; ``state`` is what the checkpoint records."""

    def __init__(self, config: RunConfig, run_dir: Path, ui: UI, tracker: UpdateTracker | None = None) -> None:
        self.config, self.run_dir, self.ui, self.tracker = config, run_dir, ui, tracker
        self.tracking: Tracking | None = None  # experiment trackers (config.trackers), set by execute
        self.online: OnlineRun | None = None  # online mode (config.online), set by execute
        self.privacy = PrivateTraining(config) if config.privacy is not None else None  # DP-SGD
        self.federated = None  # federated rounds (config.federated), set by execute
        self.state = RunState()
        self._harness = None  # an lm-eval session, made at the first evaluation that needs it
        self.start_clock()

    def start_clock(self) -> None:
        """Wall time adds up across the processes of a killed and resumed run: each checkpoint
        records the time so far, so a resumed run's ``wall_s`` is not only its last process's."""
        self._wall_before = self.state.wall_s
        self._started = time.perf_counter()

    def wall_s(self) -> float:
        return round(self._wall_before + time.perf_counter() - self._started, 3)

    # -- evaluation -----------------------------------------------------------------
    def evaluate(self, ctx: Context, stack: StrategyStack, label: str,
                 route: Callable[[str | None], ContextManager] | None = None,
                 probes: bool = True) -> tuple[list[float], float | None]:
        """Every task and (unless ``probes`` is false) every probe, each under ``route(task)``
        (default: the stack's routing). Returns the tasks' scores and the probes' mean (each
        probe's score is in ``details``)."""
        route = route or (lambda task: stack.route(ctx, task))
        stream, cfg = ctx.stream, self.config.eval
        tasks = stream.tasks + (stream.probes if probes else [])
        processes = ctx.processes.evaluation  # sharded: every process scores every item, in lockstep
        total = sum(work_units(t, len(t.test), processes) for t in tasks)
        scores: list[float] = []
        probes: list[float] = []
        details: dict[str, Any] = {}
        items: dict[str, Any] = {}
        with self.ui.bar(total, f"eval {label}") as advance:
            for task in tasks:
                is_probe = any(task is p for p in stream.probes)
                with route(None if is_probe else task.name):
                    result = evaluate_task(ctx.model, ctx.tokenizer, task, batch_size=cfg.batch_size,
                                           max_new_tokens=cfg.max_new_tokens, advance=advance,
                                           processes=processes, max_length=cfg.max_length)
                details[task.name] = {"value": result.value, "n": result.n, "stderr": result.stderr,
                                      **result.scores}
                if result.items is not None:
                    items[task.name] = item_record(result)
                (probes if is_probe else scores).append(result.value)
        probe = sum(probes) / len(probes) if probes else None
        harness, self.harness = self.config.eval.harness, None
        if harness is not None:
            if self._harness is None:
                from retain.evaluation.harness import Session

                self._harness = Session(ctx.tokenizer, harness.tasks, {t.name: t for t in tasks},
                                        harness.include_path)
            self.ui.info(f"  lm-eval: {', '.join(harness.tasks)} ({label})")
            with route(None):
                self.harness = self._harness.evaluate(ctx.accelerator.unwrap_model(ctx.model), cfg.batch_size,
                                                      harness.limit)
        #: The last evaluation's scores with their standard errors, by task and probe, each
        #: item's score and answer, and lm-eval's (``self.harness``) when ``eval.harness`` asks.
        self.details, self.items = details, items
        return scores, probe

    def evaluation_record(self, after: Any) -> dict[str, Any]:
        record = {"after": after, "scores": self.details, "items": self.items}
        return {**record, "harness": self.harness} if self.harness is not None else record

    # -- training -------------------------------------------------------------------
    def train_phase(self, ctx: Context, stack: StrategyStack, tasks: list[Task], phase: int) -> dict[str, Any]:
        if self.federated is not None:
            # Federated: the clients train (each through this method on its shard), the server averages.
            timing = self.federated.train_phase(ctx, stack, tasks, phase)
            self.state.federated = self.federated.state
            keys = [n for n, p in ctx.model.named_parameters() if p.requires_grad]
            self.state.trained_keys = sorted(set(self.state.trained_keys) | set(keys))
            return timing
        cfg = self.config.train
        seed = phase_seed(self.config.seed, phase)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        # Every phase starts in eval mode, as it does after the previous phase or in a resumed
        # process: importance scores and teacher snapshots taken here see no dropout.
        ctx.model.eval()
        # zero2 keeps weights gathered after a forward (the last evaluation's): the parameters a
        # phase trains and its optimizer must be the shards.
        sharding.reshard(ctx.model)
        online = self.online
        # Online mode: the strategies see one task without identity, whatever the stream holds.
        hook_tasks = online.hook_tasks() if online else tasks
        stack.before_task(ctx, hook_tasks)
        params = stack.trainable_parameters(ctx)
        if not params:
            raise RetainError(f"strategy '{stack.name}' left no trainable parameters for phase {phase}")
        ids = {id(p) for p in params}
        # One source of truth for what trains, whoever runs the step (the loop, es, TRL).
        for p in ctx.model.parameters():
            p.requires_grad_(id(p) in ids)
        trainable = sum(p.numel() for p in params)
        keys = [n for n, p in ctx.model.named_parameters() if id(p) in ids]

        steps = online.steps if online else cfg.max_steps * len(tasks)
        items = [] if online else [item for task in tasks for item in task.items(ctx.tokenizer)]
        # DP-SGD: this phase's noise and Poisson rates (the memory's as it stands before the phase).
        plan = self.privacy.plan_phase(len(items), steps, stack.private_replay_rate(ctx)) if self.privacy else None
        optimizer = scheduler = None
        if not (stack.takes_over_phase or stack.takes_over_step):
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            scheduler = stack.schedule(ctx, optimizer, steps) or get_scheduler(
                "constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps)
            if plan is not None:
                optimizer = self.privacy.begin(ctx.model, optimizer, plan)
            optimizer, scheduler = ctx.accelerator.prepare(optimizer, scheduler)
        if online:
            source = online.batches(ctx.tokenizer)
        elif plan is not None:
            source = poisson_batches(items, plan.sample_rate, steps, seed)
        else:
            lengths = token_lengths(ctx.tokenizer, items, cfg.max_length) if cfg.group_by_length else None
            source = batch_stream(items, cfg.batch_size, rng, lengths)
        batches = stack.batches(ctx, hook_tasks, source)
        ctx.model.train()
        every = cfg.checkpoint_every if stack.resumes_mid_phase else 0
        progress = self.state.progress if self.state.progress and self.state.progress.phase == phase else None
        self.state.progress = None
        if progress is not None:
            # The phase began again from its start (weights, strategies, seeds); replaying the
            # batch draws brings every generator and memory RNG to the checkpoint's step
            # without running the model, then the step's weights, optimizer and RNGs load.
            ctx.fast_forward = True
            try:
                for _ in islice(batches, progress.step):
                    pass
            finally:
                ctx.fast_forward = False
            phase_state = checkpoint.restore_progress(self.run_dir, progress, ctx.accelerator.unwrap_model(ctx.model),
                                                      optimizer, scheduler)
            stack.load_phase_state(ctx, phase_state)
            self.ui.info(f"  resuming phase {phase + 1} at step {progress.step + 1} of {steps}")
        else:
            progress = Progress(phase=phase, losses=[], tokens=0, seconds=0.0)
        skip = progress.step
        start = time.perf_counter() - progress.seconds
        label = "+".join(t.name for t in tasks)
        done = sum(t["steps"] for t in self.state.timings)
        with self.ui.bar(steps, f"train {label}", completed=skip) as advance:
            def on_step(loss: float, n_tokens: int) -> None:
                step = progress.step + 1
                if not math.isfinite(loss):
                    saved = (progress.step // every) * every if every else 0
                    last = f"step {saved}" if saved else "its start"
                    raise RetainError(
                        f"phase {phase + 1} ({label}): the loss became {loss} at step {step}; the run stopped "
                        f"and its checkpoint (phase {phase + 1} at {last}) resumes with `retain run --resume "
                        f"{self.run_dir}`; a smaller train.lr or train.max_grad_norm usually avoids it")
                progress.tokens += n_tokens
                progress.losses.append(loss)
                if self.tracking is not None:
                    self.tracking.step(loss, scheduler.get_last_lr()[0] if scheduler is not None else None,
                                       done + step)
                if self.tracker and step < steps and self.tracker.due(step, steps):
                    self.state.updates.append(self.tracker.measure(ctx, phase, step, done + step))
                    if self.tracking is not None:
                        self.tracking.updates(self.state.updates[-1], done + step)
                advance(1, f"loss {loss:.3f}")
                if online:
                    self.online_evaluations(ctx, stack, step)
                if every and step % every == 0 and step < steps:
                    progress.seconds = time.perf_counter() - start
                    progress.strategy = stack.phase_state()
                    self.state.wall_s = self.wall_s()
                    if ctx.run_dir is not None or ctx.processes.sharded:  # sharded: all gather, main writes
                        checkpoint.save_progress(self.run_dir, self.state, progress,
                                                 ctx.accelerator.unwrap_model(ctx.model), keys, optimizer, scheduler,
                                                 write=ctx.run_dir is not None)

            # A strategy may train the phase itself (TRL's GRPO trainer) or replace each
            # gradient step (evolution strategies); otherwise: loss, backward, clip, step.
            try:
                if not stack.train_phase(ctx, tasks, steps, on_step):
                    for items_batch in islice(batches, steps - skip):
                        if online:
                            online.before_step(ctx, progress.step,
                                               lambda task, examples: self.item_scores(ctx, task, examples))
                        if plan is not None:
                            on_step(*self.private_step(ctx, items_batch, optimizer, scheduler, params,
                                                       progress.losses))
                            continue
                        on_step(*(stack.step(ctx, items_batch)
                                  or self.gradient_step(ctx, stack, items_batch, params, optimizer, scheduler)))
            finally:
                if self.privacy is not None:
                    self.privacy.end()
        seconds = time.perf_counter() - start
        # Only now: an in-phase checkpoint's state must name the tensors of the phase-start file.
        self.state.trained_keys = sorted(set(self.state.trained_keys) | set(keys))
        ctx.model.eval()
        # Accelerate keeps every prepared optimizer alive; drop this phase's (and its
        # AdamW state, twice the trainable weights) before the next phase makes its own.
        optimizer = scheduler = None
        ctx.accelerator.free_memory()
        stack.after_task(ctx, hook_tasks)
        losses = progress.losses
        device = torch.cuda.get_device_name(ctx.accelerator.device) if ctx.accelerator.device.type == "cuda" else None
        cost = phase_cost(matmul_parameters(ctx.accelerator.unwrap_model(ctx.model)), trainable, progress.tokens,
                          seconds, ctx.accelerator.num_processes, device, cfg.precision)
        timing = {
            "phase": phase, "tasks": [t.name for t in tasks], "steps": steps, "train_s": round(seconds, 3),
            "trainable_parameters": trainable,
            "tokens": progress.tokens, "tokens_per_s": round(progress.tokens / seconds, 1) if seconds else None,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None, **cost,
        }
        return {**timing, "privacy": plan.to_dict()} if plan is not None else timing

    def item_scores(self, ctx: Context, task: Task, examples: list) -> list[float]:
        """Each example's score under the model as it is (its task's own metric)."""
        result = evaluate_task(ctx.model, ctx.tokenizer, task, examples, batch_size=self.config.eval.batch_size,
                               max_new_tokens=self.config.eval.max_new_tokens, max_length=self.config.eval.max_length)
        ctx.model.train()
        return result.items if result.items is not None else [result.value] * len(examples)

    def online_evaluations(self, ctx: Context, stack: StrategyStack, step: int) -> None:
        """Anytime evaluations due after ``step``; at a hidden boundary also a row of R."""
        online, state = self.online, self.state
        for examples in online.due(step):
            boundary = online.is_boundary(examples)
            probes = online.wants_probe(examples)
            row, probe = self.evaluate(ctx, stack, f"at {examples} examples", probes=probes)
            online.record(examples, row, probe)
            if boundary is not None:
                state.R.append(row)
                state.probe.append(probe)
                state.evaluations.append(self.evaluation_record([ctx.stream.task_names[boundary]]))
                state.phases.append([ctx.stream.task_names[boundary]])
                self.ui.info(f"  hidden boundary after {ctx.stream.task_names[boundary]} ({examples} examples): "
                             + "  ".join(f"{n}={v:.1f}" for n, v in zip(ctx.stream.task_names, row)))
        ctx.model.train()

    def gradient_step(self, ctx: Context, stack: StrategyStack, items: list, params: list, optimizer,
                      scheduler) -> tuple[float, int]:
        """One optimizer step on a batch; returns the loss and the batch's token count.

        In a data-parallel run this process trains on its share of the global batch, its token
        losses divided by the global count of target tokens, and the gradients are summed over
        processes, so the update is the one-process update on the whole batch. Each strategy's
        extra loss is this process's part of its term (see ``Strategy.extra_loss``)."""
        processes = ctx.processes
        if len(items) < processes.count:  # the same on every process: all stop here together
            raise RetainError(f"a batch of {len(items)} examples cannot be split over {processes.count} processes; "
                              "train.batch_size must be at least the number of processes (a task with fewer "
                              "training examples than processes cannot fill one either)")
        share = processes.share(items)
        batch = collate(ctx.tokenizer, share, self.config.train.max_length)
        batch = {k: v.to(ctx.accelerator.device) for k, v in batch.items()}
        num_items = None
        if processes.count > 1:
            # The summed token losses are divided by the global count of targets; a label at
            # column c is predicted at c - 1, so the targets are labels[:, 1:].
            targets = processes.sum(int((batch["labels"][:, 1:] != -100).sum()))[0]
            num_items = max(int(targets), 1)
        with ctx.accelerator.autocast():
            outputs = lm_outputs(ctx.model, batch, num_items, full_logits=stack.reads_all_logits)
            # A batch of only strategy-scored items (distillation) has no LM loss.
            has_labels = bool((batch["labels"] != -100).any())
            loss = outputs.loss if has_labels else outputs.logits.sum() * 0.0
            extra = stack.extra_loss(ctx, batch, outputs, share)
            if extra is not None:
                loss = loss + extra
        ctx.accelerator.backward(loss)
        processes.sum_gradients(params)
        if self.config.train.max_grad_norm:
            ctx.accelerator.clip_grad_norm_(params, self.config.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value, tokens = processes.sum(loss.item(), int(batch["attention_mask"].sum()))
        return value, int(tokens)

    def private_step(self, ctx: Context, items: list, optimizer, scheduler, params: list,
                     losses: list[float]) -> tuple[float, int]:
        """DP-SGD's step on a Poisson batch (which may be empty: a step of noise alone). The
        loss reported for an empty batch repeats the last one."""
        batch = None
        if items:
            batch = collate(ctx.tokenizer, items, self.config.train.max_length)
            batch = {k: v.to(ctx.accelerator.device) for k, v in batch.items()}
        loss = self.privacy.step(batch, params, optimizer, ctx.accelerator.autocast)
        scheduler.step()
        tokens = int(batch["attention_mask"].sum()) if batch is not None else 0
        return (loss.item() if loss is not None else (losses[-1] if losses else 0.0)), tokens

    def membership(self, ctx: Context, stack: StrategyStack, when: str) -> None:
        """The membership-inference check (``eval.membership``) on the model as it is now."""
        from retain.evaluation.membership import membership_check

        cfg = self.config.eval
        record = self.state.membership or {}
        if not cfg.membership or when in record:
            return
        self.ui.info(f"  membership inference ({when}): {cfg.membership} members and non-members per task")
        record[when] = membership_check(ctx.model, ctx.tokenizer, ctx.stream.tasks, cfg.membership, cfg.sample_seed,
                                        cfg.batch_size, lambda task: stack.route(ctx, task))
        self.state.membership = record

    def finish(self, ctx: Context, stack: StrategyStack) -> None:
        """After the last phase: the task-agnostic evaluation of per-task methods, and any
        strategy's final evaluations (merged adapters)."""
        router = stack.task_router()
        if router is not None and router.centroids and self.state.routing is None:
            total = sum(len(t.test) for t in ctx.stream.tasks if t.name in router.centroids)
            with self.ui.bar(total, "eval task-agnostic (routed)") as advance:
                self.state.routing = agnostic_evaluation(ctx, stack, router, advance)
            r = self.state.routing
            self.ui.info(f"  task-agnostic: routing accuracy {r['accuracy']:.1f}%, AA {r['AA']:.1f}")
            self.checkpoint(ctx, stack)
        if self.state.final is None:
            final = stack.finish(ctx, lambda route, label: self.evaluate(ctx, stack, label, route))
            self.state.final = final or {}
            if final:
                self.checkpoint(ctx, stack)

    def checkpoint(self, ctx: Context, stack: StrategyStack) -> None:
        """Between phases: the strategies' state and the trained tensors as they are now."""
        self.state.strategy = stack.state_dict()
        self.state.wall_s = self.wall_s()
        # The main process writes (see Context.run_dir); with sharded weights all gather them first.
        if ctx.run_dir is not None or ctx.processes.sharded:
            checkpoint.save(self.run_dir, self.state, ctx.accelerator.unwrap_model(ctx.model), stack.state_tensors(),
                            write=ctx.run_dir is not None)


def check_run(config: RunConfig) -> tuple[Stream, StrategyStack]:
    """Everything that needs only the config and the data: ``retain validate`` and the start
    of ``retain run`` (before the model loads)."""
    stream = build_stream(config)
    stack = StrategyStack.from_config(config)
    try:
        stack.check(config, stream)
    except ValueError as exc:
        raise RetainError(f"strategy '{stack.name}': {exc}") from None
    if config.eval.harness is not None:
        check_harness(config, stream, stack)
    if config.trackers:
        from retain import tracking

        tracking.check(config.trackers)
    from retain.models import quantization

    quantization.check(config, stack)
    if config.online is not None:
        check_online(config, stack)
    if config.privacy is not None:
        from retain import privacy

        privacy.check(config, stream, stack)
    if config.federated is not None:
        from retain import federated

        federated.check(config, stream, stack)
    if config.train.gradient_checkpointing and (stack.takes_over_step or stack.takes_over_phase):
        raise RetainError(f"train.gradient_checkpointing: strategy '{stack.name}' replaces the loop's training "
                          "step, which this setting acts on; drop it")
    parallel.check(config, stack, parallel.launched_processes())
    sharding.check(config, stack, sharding.requested(config), parallel.launched_processes())
    return stream, stack


def check_online(config: RunConfig, stack: StrategyStack) -> None:
    """Online mode hides the boundaries: a strategy that needs them is refused, with why."""
    free = sorted(n for n, c in registry().items() if c.task_free)
    for s in stack.strategies:
        if s.task_free:
            continue
        why = ("it keys its state by each phase's task" if s.per_task_phases else
               "it freezes each task's parameters at the task's end" if s.freezes_earlier else
               "it consolidates the weights at each task's end" if s.anchors_weights else
               "it snapshots the model as a teacher at each task's start" if s.distils_previous_model else
               "it plans its own phases" if "plan" in s.overridden() else
               "it acts at task starts or ends")
        raise RetainError(f"online: strategy '{s.name}' needs task boundaries ({why}), which online mode hides; "
                          f"task-free strategies: {', '.join(free)}")


def check_harness(config: RunConfig, stream: Stream, stack: StrategyStack) -> None:
    from retain.evaluation.harness import PREFIX, require_lm_eval

    require_lm_eval()
    wrapping = [s.name for s in stack.strategies if s.rewrites_input]
    if wrapping:
        raise RetainError(f"eval.harness: {wrapping[0]} rewrites the model's input (a wrapper lm-eval's HFLM "
                          "cannot call); score it with retain's own evaluation")
    scorable = {t.name: t for t in stream.tasks + stream.probes if t.metric == "choice"}
    for name in config.eval.harness.tasks:
        if name.startswith(PREFIX) and name[len(PREFIX):] not in scorable:
            raise RetainError(f"eval.harness.tasks: '{name}' names no choice task of this run; valid: "
                              + (", ".join(PREFIX + n for n in scorable) or "none"))


def prepare(config: RunConfig, ui: UI, project_dir: Path | None = None) -> tuple[Context, StrategyStack]:
    """Everything that can fail on bad input, before a run directory is touched."""
    stream, stack = check_run(config)
    for key in config.unused_sections():
        ui.info(f"note: section '{key}' configures a method not in strategy '{config.strategy}'; it is not used")
    ui.info(f"loading model [bold]{config.model}[/bold]")
    model, tokenizer = load_model(config.model, trust_remote_code=config.trust_remote_code, seed=config.seed,
                                  quantization=config.model_quantization)
    if config.model_quantization is not None:
        from retain.models.quantization import prepare_for_training

        model = prepare_for_training(model)
    if config.train.gradient_checkpointing:
        # Non-reentrant: works with a frozen base (LoRA), where the reentrant form sees no input needing grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cpu = config.train.device == "cpu" or not torch.cuda.is_available()
    # Trackers (config.trackers) log through the Accelerator; only a run directory has them.
    trackers = config.trackers if project_dir is not None else []
    slow = slow_cpu_precision(config.train.precision, cpu)
    if slow:
        log.warning(slow)
    # split_batches: the loop splits each global batch itself, so the prepared scheduler steps
    # once per optimizer step, not once per process (Accelerate ignores the old split_batches
    # argument: it must come through DataLoaderConfiguration).
    mode = sharding.requested(config)
    with sharding.without_accelerate_fsdp():
        accelerator = Accelerator(cpu=cpu, mixed_precision=config.train.precision, log_with=trackers or None,
                                  project_dir=str(project_dir / "trackers") if trackers else None,
                                  dataloader_config=DataLoaderConfiguration(split_batches=True))
    processes = parallel.Processes(accelerator)
    ctx = Context(config=config, model=model, tokenizer=tokenizer, accelerator=accelerator, stream=stream,
                  processes=processes)
    torch.manual_seed(config.seed)
    try:
        stack.setup(ctx)
    except ValueError as exc:
        raise RetainError(f"strategy '{stack.name}': {exc}") from None
    # With N processes the loop sums the gradients itself (see retain.parallel), so the model is
    # placed and autocast as for evaluation, without a DDP wrapper.
    ctx.model = accelerator.prepare_model(ctx.model, evaluation_mode=processes.count > 1)
    if mode is not None:
        ctx.model = sharding.shard(ctx.model, mode)
        processes.sharding = mode
    return ctx, stack


def slow_cpu_precision(precision: str, cpu: bool) -> str | None:
    """Why bf16/fp16 autocast would slow this run down, or None: on a CPU without native bf16/fp16
    matmuls (no AVX512-BF16/AMX, e.g. AVX2-only) oneDNN emulates them, ~5x slower than fp32 on a
    2-core AMD EPYC, where a CPU with AVX512-BF16 runs them ~2x faster
    (benchmarks/results/cpu-precision.md)."""
    if not cpu or precision == "no":
        return None
    native = (torch.ops.mkldnn._is_mkldnn_bf16_supported() if precision == "bf16"
              else torch.ops.mkldnn._is_mkldnn_fp16_supported())
    if native:
        return None
    return (f"train.precision={precision} on a CPU without native {precision} matmuls "
            f"({torch.backends.cpu.get_cpu_capability()}): autocast emulates them, several times slower "
            "than fp32; set train.precision=no here")


def run_dir_for(config: RunConfig) -> Path:
    return Path(config.output_dir) / config.name


def execute(config: RunConfig, *, run_dir: Path | None = None, resume: bool = False, quiet: bool = False,
            overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a whole stream and write the run directory. Returns results.json's content."""
    from retain.reporting import finalize, load_results

    # In a data-parallel run only the main process (RANK 0) prints and writes.
    main = parallel.main_process()
    ui = UI(quiet or not main)
    run_dir = Path(run_dir) if run_dir else run_dir_for(config)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RetainError(
                f"run directory {run_dir} already exists; resume it with `retain run --resume {run_dir}`, "
                "pick another name (name=...), or pass --overwrite"
            )
    # A corrupt checkpoint is refused before the model loads.
    saved = checkpoint.load_state(run_dir) if resume else None
    ctx, stack = prepare(config, ui, project_dir=run_dir)
    # Every process has checked the directory (above) before the main one changes it.
    ctx.processes.barrier()
    if main:
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ctx.run_dir = run_dir
    # W0 for the update analysis: the model as set up, before a resumed run restores weights.
    tracker = UpdateTracker(ctx, config.analysis) if config.analysis.enabled else None
    run = Run(config, run_dir, ui, tracker)
    if saved:
        run.state = saved
        stack.load_state_dict(ctx, saved.strategy)
        # Sharded: a strategy's per-weight tensors (EWC's Fisher and anchors) become shards like the weights.
        stack.load_state_tensors(sharding.fit(ctx.model, checkpoint.load_strategy_tensors(
            run_dir, saved, ctx.accelerator.device)))
        checkpoint.restore_tensors(run_dir, ctx.accelerator.unwrap_model(ctx.model), saved)
        inside = f", inside phase {saved.progress.phase + 1} at step {saved.progress.step}" if saved.progress else ""
        ui.info(f"resuming {run_dir} after {saved.completed_phases} completed phase(s){inside}")
    # Written only once the checkpoint loaded: a refused resume leaves the run as it was.
    if main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.resolved(), sort_keys=False))
    run.tracking = tracking = Tracking(ctx.accelerator, config, run_dir)
    run.state.num_processes = ctx.processes.count
    run.state.sharding = ctx.processes.sharding

    def track(row: list[float], probe: float | None) -> None:
        suites = {p.name: run.details[p.name] for p in ctx.stream.probes if p.name in run.details}
        tracking.evaluation(ctx.stream.task_names, row, probe, suites, sum(t["steps"] for t in state.timings))
    run.start_clock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    state = run.state
    if state.base is None:
        state.base, state.base_probe = run.evaluate(ctx, stack, "base model")
        state.evaluations = [run.evaluation_record("base")]
        run.membership(ctx, stack, "base")
        track(state.base, state.base_probe)
        run.checkpoint(ctx, stack)

    # Online mode: the whole stream is one phase, presented by the online schedule.
    phases = [list(ctx.stream.tasks)] if config.online else stack.plan(ctx.stream.tasks)
    if config.online:
        run.online = OnlineRun(config, ctx.stream, state)
    if config.federated:
        from retain.federated import FederatedRun

        run.federated = FederatedRun(config, state.federated, run_dir)
    for phase, tasks in enumerate(phases):
        if phase < state.completed_phases:
            continue
        ctx.phase = phase
        ui.info(f"[bold]phase {phase + 1}/{len(phases)}[/bold]: {', '.join(t.name for t in tasks)}")
        timing = run.train_phase(ctx, stack, tasks, phase)
        eval_start = time.perf_counter()
        row, probe = run.evaluate(ctx, stack, f"after {timing['tasks'][-1]}")
        timing["eval_s"] = round(time.perf_counter() - eval_start, 3)
        state.R.append(row)
        state.probe.append(probe)
        if run.online:  # the stream's end: its last hidden boundary
            run.online.record(run.online.total, row, probe)
            timing["tasks"] = [ctx.stream.task_names[-1]]
        state.evaluations.append(run.evaluation_record(timing["tasks"]))
        if tracker:
            steps_done = sum(t["steps"] for t in state.timings) + timing["steps"]
            # The phase end is scored by the evaluation just done; the tracker only measures dW.
            record = tracker.measure(ctx, phase, timing["steps"], steps_done, score=False)
            scores = dict(zip(ctx.stream.task_names, row))
            state.updates.append({**record, "probe": probe, "scores": scores})
            tracking.updates(record, steps_done)
        state.phases.append(timing["tasks"])
        state.timings.append(timing)
        track(row, probe)
        state.strategy_stats.append(stack.stats())
        state.completed_phases = phase + 1
        state.peak_memory_mb = max(state.peak_memory_mb, round(peak_memory_mb(), 1))
        run.checkpoint(ctx, stack)
        ui.info("  " + "  ".join(f"{n}={v:.1f}" for n, v in zip(ctx.stream.task_names, row))
                + (f"  probe={probe:.1f}" if probe is not None else ""))
    run.finish(ctx, stack)
    run.membership(ctx, stack, "final")
    state.wall_s = run.wall_s()
    if ctx.processes.sharded:  # adapters and merged weights are written from whole tensors
        sharding.gather_for_export(ctx.model)
    if not main:
        # The main process writes the results; the others return what it writes.
        ctx.processes.barrier()
        return load_results(run_dir)
    stack.export(ctx, run_dir)
    results = finalize(run_dir, config, ctx.stream, state.to_dict())
    tracking.finish(results, sum(t["steps"] for t in state.timings))
    ctx.processes.barrier()
    sharding.release()
    return results


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RetainError(f"{run_dir} is not a run directory (no config.yaml)")
    return validate_config(read_yaml(path), source=str(path))


def restore(run_dir: Path) -> tuple[Context, StrategyStack]:
    """Rebuild a finished run's model (base + trained tensors + adapters) for generation."""
    config = load_run_config(run_dir)
    # A sharded run's checkpoint holds whole tensors: one process loads it unsharded.
    config.train.sharding = "none"
    ctx, stack = prepare(config, UI(quiet=True))
    ctx.run_dir = run_dir
    saved = checkpoint.load_state(run_dir)
    if not saved:
        raise RetainError(f"{run_dir} has no checkpoint to restore")
    stack.load_state_dict(ctx, saved.strategy)
    checkpoint.restore_tensors(run_dir, ctx.accelerator.unwrap_model(ctx.model), saved)
    return ctx, stack
