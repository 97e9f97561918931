"""Population members scored in parallel, with results identical to a serial run.

Two pools with one interface, ``score(items, members) -> (rewards, most restore fixes)``
and ``update(members, z)``, splitting the members by one sharding rule (``shard`` and
``gather``) so that the rewards come back in member order whichever pool ran them.

Forked processes (``WorkerPool``): each worker is forked from the run at the start of a
phase, so it holds the same weights. Only (seed, sign) pairs, prompts and rewards cross
process boundaries: after every iteration each worker applies the same update from the
same seeds and z-scores, which is deterministic, so all copies stay bit-identical without
ever sending weights. Written with the standard library's multiprocessing: the pattern
(broadcast seeds, gather scalars) needs nothing more. Fork keeps the model without
reloading it; CUDA cannot be forked, so on a GPU the population runs serially.

Ray actors (``RayPool``): each actor rebuilds the run from its config (model, stream,
strategies: the same code path as ``retain run``), then receives the trainable weights
once per phase through Ray's object store; from then on it works as a forked worker.
Every node needs the model and the data files at the paths the config names. Ray is
optional: ``pip install ray``.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable, Sequence

import torch

Member = tuple[int, int]


def shard(members: Sequence[Member], n: int) -> list[list[Member]]:
    """Member w, w+n, w+2n, ... to worker w."""
    return [list(members[w::n]) for w in range(n)]


def gather(results: list[tuple[list[float], int]], total: int) -> tuple[list[float], int]:
    """The shards' (rewards, fixes) back in member order, and the most fixes of any shard."""
    n = len(results)
    rewards = [0.0] * total
    for w, (share_rewards, _) in enumerate(results):
        rewards[w::n] = share_rewards
    return rewards, max(fixes for _, fixes in results)


def _serve(conn, score: Callable, update: Callable) -> None:
    # A forked child must not reuse the parent's OpenMP thread pool (it hangs); one thread
    # per worker, as PyTorch's own DataLoader workers do. CPU matrix products split work
    # over output blocks, not sums, so one thread computes the same numbers as several.
    torch.set_num_threads(1)
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            conn.close()
            return
        try:
            conn.send(("ok", score(*msg[1:]) if msg[0] == "score" else update(*msg[1:])))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
            conn.send(("error", repr(exc)))


class WorkerPool:
    """``workers`` forked processes; ``score(items, members)`` -> rewards in member order."""

    def __init__(self, workers: int, score: Callable, update: Callable) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            raise RuntimeError("es.workers > 1 forks the run, which CUDA does not allow; use es.workers: 1 on a GPU")
        ctx = mp.get_context("fork")
        self.conns, self.procs = [], []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, score, update), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def _gather(self) -> list[Any]:
        out = []
        for conn in self.conns:
            status, value = conn.recv()
            if status == "error":
                raise RuntimeError(f"an ES worker failed: {value}")
            out.append(value)
        return out

    def score(self, items: list, members: list[tuple[int, int]]) -> tuple[list[float], int]:
        for conn, share in zip(self.conns, shard(members, len(self.conns))):
            conn.send(("score", items, share))
        return gather(self._gather(), len(members))

    def update(self, *args) -> None:
        for conn in self.conns:
            conn.send(("update", *args))
        self._gather()

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.conns, self.procs = [], []


def _require_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("es.backend: ray needs Ray installed (pip install 'ray>=2.9'); "
                           "es.backend: processes needs nothing more") from None
    return ray


class RayWorker:
    """One population scorer (wrapped by ``ray.remote`` when the pool starts)."""

    def __init__(self, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        from retain.config import validate_config
        from retain.loop import prepare
        from retain.ui import UI

        torch.set_num_threads(1)  # as the forked workers: one thread each, the same numbers
        self.ctx, stack = prepare(validate_config(config), UI(quiet=True))
        self.es = next(s for s in stack.strategies if s.name == "es")
        self.params = self.es.params(self.ctx)
        with torch.no_grad():
            for name, p in self.params:
                p.copy_(weights[name])

    def score(self, items, members) -> tuple[list[float], int]:
        from retain.evaluation.scoring import eval_mode

        with eval_mode(self.ctx.model):
            return self.es.population_rewards(self.ctx, items, members, self.params)

    def update(self, members, z) -> int:
        return self.es.update(self.params, members, z)


class RayPool:
    """``workers`` Ray actors with the WorkerPool interface: score(items, members), update(members, z)."""

    def __init__(self, workers: int, config: dict[str, Any], params: list[tuple[str, torch.nn.Parameter]],
                 address: str | None = None) -> None:
        ray = _require_ray()
        if not ray.is_initialized():
            # No address: a Ray of its own ("local"), not whatever cluster this machine last recorded.
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": workers}))
        self.ray = ray
        weights = ray.put({name: p.detach().cpu().clone() for name, p in params})
        actor = ray.remote(num_cpus=1)(RayWorker)
        self.actors = [actor.remote(config, weights) for _ in range(workers)]

    def score(self, items: list, members: list[tuple[int, int]]) -> tuple[list[float], int]:
        shares = shard(members, len(self.actors))
        results = self.ray.get([a.score.remote(items, share) for a, share in zip(self.actors, shares)])
        return gather(results, len(members))

    def update(self, members, z) -> None:
        self.ray.get([a.update.remote(members, z) for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
