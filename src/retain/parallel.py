"""Data-parallel runs: N processes (``torchrun`` or ``accelerate launch``) share one run.

Every process runs the same loop on the same seeds, so each draws the same global batch,
the same replay memory and the same ES members; what is split is the work on them:

- a step's global batch: each process takes a contiguous share, its token losses are summed
  and divided by the global token count, and the gradients are summed across processes, so
  the step equals the one-process step on the whole batch (up to float summation order);
- evaluation: each process scores a contiguous share of a task's test items, and the raw
  answers are gathered in order, so every process computes the one-process score;
- estimates over examples (EWC's Fisher): a share each, summed across processes;
- strategies' loss terms: each process adds its part (a weight penalty divided by N, a
  distillation mean's share divided by the global count), see ``Strategy.extra_loss``;
- ES populations: member w, w+N, ... on process w, rewards gathered in member order.

Gradients are reduced here rather than by wrapping the model in DDP: strategies add
adapters between phases (per-task LoRA) and change what trains, and a DDP wrapper fixes
its parameters when it is built. Only the main process writes files and prints.
"""

from __future__ import annotations

import os
from itertools import chain
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import gather_object

T = TypeVar("T")

#: Gradient elements all-reduced in one call (flattened), as DDP buckets them.
BUCKET = 2**24


class Processes:
    """The processes of one run; with one process every operation is the identity."""

    def __init__(self, accelerator: Accelerator | None = None) -> None:
        self.count = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        # Where collectives' tensors live (NCCL reduces CUDA tensors only).
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")
        #: "zero2" / "zero3" when the model is sharded (``retain.sharding``): FSDP reduces the
        #: gradients, and every forward is a collective, so evaluation runs in lockstep on all items.
        self.sharding: str | None = None

    @property
    def sharded(self) -> bool:
        return self.sharding is not None

    @property
    def evaluation(self) -> "Processes":
        """Who splits evaluation: these processes, or (sharded) each process scores every item."""
        return SINGLE if self.sharded else self

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous share of ``items``; shares differ in size by at most one,
        the first processes taking the extra items."""
        base, extra = divmod(len(items), self.count)
        start = self.rank * base + min(self.rank, extra)
        return list(items[start:start + base + (1 if self.rank < extra else 0)])

    def gather(self, part: list[T]) -> list[T]:
        """Every process's ``share`` results, concatenated in rank order (the original order)."""
        if self.count == 1:
            return part
        return list(chain.from_iterable(gather_object([part])))

    def sum(self, *values: float) -> list[float]:
        """Numbers each summed over processes, in one collective (float64, so token counts stay exact)."""
        if self.count == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def replicated(self, term: torch.Tensor) -> torch.Tensor:
        """This process's part of a loss term every process computes whole (a weight penalty):
        the parts of all processes add up to the term once."""
        return term / self.count

    def mean(self, total: torch.Tensor, count: float) -> torch.Tensor:
        """This process's part of a mean over the global batch (``total`` summed over this
        process's share, ``count`` its share's terms): the parts add up to the global mean.
        Every process must call it at every step (it sums the counts across processes)."""
        return total / max(self.sum(count)[0], 1.0)

    def sum_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum tensors in place across processes, in flattened buckets."""
        if self.count == 1:
            return
        for bucket in buckets(tensors):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(part.view_as(t))

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` across processes. A parameter no process computed a
        gradient for keeps none (the optimizer then skips it, as with one process: an expert
        no example was routed to); one that only some processes reached gets zeros elsewhere."""
        if self.count == 1 or self.sharded:  # sharded: FSDP reduce-scattered them in the backward pass
            return
        reached = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        dist.all_reduce(reached, op=dist.ReduceOp.SUM)
        live = [p for p, n in zip(params, reached.tolist()) if n > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # Grouped by dtype: one flat buffer holds one dtype.
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in live:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            self.sum_tensors(grads)

    def barrier(self) -> None:
        if self.count > 1:
            dist.barrier()


SINGLE = Processes()


def buckets(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of at most BUCKET elements (a tensor larger than that alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and size + t.numel() > BUCKET:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by torchrun and accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main_process() -> bool:
    """Whether this is the process that prints and writes (``RANK`` 0, or no launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def first_refusal(stack: Any, attr: str, unchecked: str) -> tuple[str, str, str] | None:
    """The first strategy of ``stack`` whose ``attr`` (``data_parallel``, ``sharded``) is not ""
    (it works): its name, why not (``unchecked`` when it was not reviewed), and those that work."""
    from retain.strategies import registry

    for s in stack.strategies:
        if getattr(s, attr) != "":
            works = sorted(n for n, c in registry().items() if getattr(c, attr) == "")
            return s.name, getattr(s, attr) or unchecked, ", ".join(works)
    return None


def check(config: Any, stack: Any, processes: int) -> None:
    """Refuse, before anything runs, what a run of ``processes`` processes would not do as
    one process does."""
    from retain.errors import RetainError

    if processes <= 1:
        return
    launched = f"this run was launched as {processes} processes (WORLD_SIZE)"
    refused = first_refusal(stack, "data_parallel", "it has not been checked to give the one-process result when "
                            "the work is split")
    if refused:
        name, why, works = refused
        raise RetainError(f"strategy '{name}' cannot run data-parallel: {why}; {launched}. Strategies that can: "
                          f"{works}; or launch `retain run` as one process")
    if config.train.batch_size < processes:
        raise RetainError(f"train.batch_size: {config.train.batch_size} cannot give each of the {processes} "
                          f"processes an example of every batch; {launched}. Use a batch of at least {processes}")
    refused = [
        (config.online is not None, "online", "online mode scores and trains batch by batch in one process"),
        (config.privacy is not None, "privacy", "DP-SGD's per-example clipping and noise are not split across "
         "processes"),
        (config.federated is not None, "federated", "federated clients are processes of their own (Flower)"),
        (config.eval.harness is not None, "eval.harness", "lm-eval's scorer runs in one process"),
        (bool(config.seeds), "seeds", "the seeds' runs and their aggregate are written by one process; launch one "
         "seed at a time (seed=S) or dispatch the seeds with --ray"),
        (any(s.name == "es" for s in stack.strategies) and config.options("es").workers > 1, "es.workers",
         "the population is already split over the launched processes"),
    ]
    for bad, key, why in refused:
        if bad:
            raise RetainError(f"{key}: not available in a data-parallel run ({why}); {launched}. Drop {key} or "
                              "launch `retain run` as one process")
