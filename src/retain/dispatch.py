"""Runs dispatched as Ray tasks: the arms of a study and the seeds of a multi-seed run.

A benchmark table is methods x seeds x task orders; on a cluster each run goes to a node
with the resources it declares (``--cpus-per-run``, ``--gpus-per-run``) and they all train
at once. Ray does the placement, retries and transport; ``retain`` decides what a run is:
each task calls the same ``execute`` as ``retain run``, resuming from the run directory's
checkpoint when one is there. So a run whose node is lost resumes where it stopped (on its
retry, or when the command is given again), and a finished one is never run twice. The
run directories must be on storage every node sees (one machine, or a shared filesystem).

``address`` is what ``ray.init`` takes: ``auto`` (the cluster this machine belongs to),
``HOST:PORT`` of a head node, ``ray://HOST:PORT``, or ``local`` for a Ray started for the
command on this machine.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from retain.config import RunConfig
from retain.errors import RetainError


@dataclass(frozen=True)
class RayOptions:
    """Where runs go (``--ray``) and what each one asks of a node."""

    address: str
    cpus: float = 1
    gpus: float = 0


@dataclass
class Job:
    """One run: its validated config and its directory."""

    config: RunConfig
    run_dir: Path


def _require_ray():
    try:
        import ray
    except ImportError:
        raise RetainError("--ray needs Ray: pip install 'retain[ray]'") from None
    return ray


def _run(config: RunConfig, run_dir: str, cpus: float) -> dict[str, Any]:
    """The body of one Ray task: the run as ``retain run`` would do it, resumed if it was killed."""
    import ray
    import torch

    from retain.loop import execute

    torch.set_num_threads(max(int(cpus), 1))
    folder = Path(run_dir)
    resume = (folder / "checkpoints" / "state.json").is_file() and not (folder / "results.json").is_file()
    results = execute(config, run_dir=folder, resume=resume, quiet=True, overwrite=not resume)
    return {"run": run_dir, "resumed": resume, "node": ray.get_runtime_context().get_node_id(),
            "seconds": results.get("wall_s")}


def check_resources(ray, cpus: float, gpus: float) -> None:
    """Refuse a request no node can meet: Ray would wait for it forever."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus]
    if not fits:
        have = ", ".join(f"{n['Resources'].get('CPU', 0):g} CPU / {n['Resources'].get('GPU', 0):g} GPU"
                         for n in nodes) or "no live node"
        raise RetainError(f"--cpus-per-run {cpus:g} --gpus-per-run {gpus:g}: no node of the Ray cluster has that "
                          f"much (its nodes: {have})")


@contextmanager
def connected(options: RayOptions) -> Iterator[None]:
    """Ray initialized for ``options`` (unless it already is), with the request checked against
    the cluster's nodes before any run is prepared; shut down after, if started here."""
    ray = _require_ray()
    started = not ray.is_initialized()
    # ray.init records the cluster in RAY_ADDRESS; a later Ray in this process (a Flower
    # simulation) must not find the address of one shut down here.
    before = os.environ.get("RAY_ADDRESS")
    if started:
        # The workers import retain from the driver's environment (a cluster's nodes need it installed).
        env = {"env_vars": {"OMP_NUM_THREADS": str(max(int(options.cpus), 1))}}
        if options.address == "local":
            # address "local" starts one; None would join any cluster this machine last recorded.
            ray.init(address="local", runtime_env=env, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=options.address, runtime_env=env, log_to_driver=False)
    try:
        check_resources(ray, options.cpus, options.gpus)
        yield
    finally:
        if started:
            ray.shutdown()
            if before is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = before


def dispatch(jobs: list[Job], options: RayOptions,
             on_done: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Inside ``connected(options)``: run every job that has no results yet as a Ray task;
    return one record per job run (run directory, whether it resumed, the node, seconds), in
    the order they finished."""
    import ray

    todo = [j for j in jobs if not (j.run_dir / "results.json").is_file()]
    # Each retry (a lost worker or node) resumes the run from its last checkpoint.
    task = ray.remote(num_cpus=options.cpus, num_gpus=options.gpus, max_retries=2)(_run)
    pending = {task.remote(j.config, str(j.run_dir), options.cpus): j for j in todo}
    done = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        try:
            record = ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:
            for ref in pending:
                ray.cancel(ref)
            raise RetainError(f"run '{job.config.name}' ({job.run_dir}) failed on the cluster: "
                              f"{exc.cause if getattr(exc, 'cause', None) else exc}; the other runs were "
                              "cancelled; give the command again to resume them") from None
        done.append(record)
        if on_done is not None:
            on_done(record)
    return done


def announce(ui, jobs: list[Job], options: RayOptions) -> Callable[[dict[str, Any]], None]:
    """Say what goes to the cluster; return the callback that reports each finished run."""
    todo = sum(not (j.run_dir / "results.json").is_file() for j in jobs)
    ui.info(f"dispatching {todo} of {len(jobs)} runs to Ray at {options.address} ({options.cpus:g} CPU"
            + (f", {options.gpus:g} GPU" if options.gpus else "") + " each)")
    return lambda r: ui.info(f"  {r['run']} finished on node {r['node'][:8]}"
                             + (" (resumed from its checkpoint)" if r["resumed"] else ""))
