"""Population members scored in parallel processes, with results identical to a serial run.

Each worker is forked from the run at the start of a phase, so it holds the same weights.
Only (seed, sign) pairs, prompts and rewards cross process boundaries: after every
iteration each worker applies the same update from the same seeds and z-scores, which is
deterministic, so all copies stay bit-identical without ever sending weights.

Written with the standard library's multiprocessing: the pattern (broadcast seeds, gather
scalars) needs nothing more, and a cluster framework would add a dependency for it.
Fork keeps the model without reloading it; CUDA cannot be forked, so on a GPU the
population runs serially (one GPU is saturated by one member's generation anyway).
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable

import torch


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
        shares = [members[w::len(self.conns)] for w in range(len(self.conns))]
        for conn, share in zip(self.conns, shares):
            conn.send(("score", items, share))
        results = self._gather()
        rewards = [0.0] * len(members)
        for w, (share_rewards, _) in enumerate(results):
            rewards[w::len(self.conns)] = share_rewards
        return rewards, max(fixes for _, fixes in results)

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
