"""Population members scored by Ray actors, on one machine or across a cluster.

Each actor rebuilds the run from its config (model, stream, strategies: the same code
path as ``retain run``), then receives the trainable weights once per phase through
Ray's object store. From then on only seeds, prompts and rewards travel, and every actor
applies the same update from the same seeds and z-scores, as the forked workers do, so
the result equals the serial run. Every node needs the model and the data files at the
paths the config names. Ray is optional: ``pip install ray``.
"""

from __future__ import annotations

from typing import Any

import torch


def _require_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("es.backend: ray needs Ray installed (pip install 'ray>=2.9'); "
                           "es.backend: processes needs nothing more") from None
    return ray


class _Worker:
    """One population scorer (wrapped by ``ray.remote`` when the pool starts)."""

    def __init__(self, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        from retain.config import validate_config
        from retain.loop import prepare
        from retain.ui import UI

        torch.set_num_threads(1)  # as the forked workers: one thread each, the same numbers
        self.ctx, stack = prepare(validate_config(config), UI(quiet=True))
        self.es = next(s for s in stack.strategies if s.name == "es")
        self.params = self.es._params(self.ctx)
        with torch.no_grad():
            for name, p in self.params:
                p.copy_(weights[name])

    def score(self, items, members) -> tuple[list[float], int]:
        from retain.evaluation.scoring import eval_mode

        with eval_mode(self.ctx.model):
            return self.es.population_rewards(self.ctx, items, members, self.params)

    def update(self, members, z) -> int:
        return self.es._update(self.params, members, z)


class RayPool:
    """``workers`` Ray actors with the WorkerPool interface: score(items, members), update(members, z)."""

    def __init__(self, workers: int, config: dict[str, Any], params: list[tuple[str, torch.nn.Parameter]],
                 address: str | None = None) -> None:
        ray = _require_ray()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": workers}))
        self.ray = ray
        weights = ray.put({name: p.detach().cpu().clone() for name, p in params})
        actor = ray.remote(num_cpus=1)(_Worker)
        self.actors = [actor.remote(config, weights) for _ in range(workers)]

    def score(self, items: list, members: list[tuple[int, int]]) -> tuple[list[float], int]:
        n = len(self.actors)
        shares = [members[w::n] for w in range(n)]
        results = self.ray.get([a.score.remote(items, share) for a, share in zip(self.actors, shares)])
        rewards = [0.0] * len(members)
        for w, (share_rewards, _) in enumerate(results):
            rewards[w::n] = share_rewards
        return rewards, max(fixes for _, fixes in results)

    def update(self, members, z) -> None:
        self.ray.get([a.update.remote(members, z) for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
