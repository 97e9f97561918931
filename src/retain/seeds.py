"""Seeds as an axis: ``seeds: [0, 1, 2]`` runs the config once per seed and aggregates.

Each seed is an ordinary run directory, ``<run>/seed-<s>/``, with its own results, report
and checkpoints; ``<run>/aggregate.json`` and ``<run>/report.md`` hold the mean, standard
deviation and per-seed values of every metric, with a 95% interval over seeds and test
items together (a bootstrap that redraws the seeds and, within each, the items). A killed
multi-seed run resumes where it stopped: finished seeds are read back, a seed with a
checkpoint continues from it, the others start.

Only the seed changes between the runs: the test items are drawn with ``eval.sample_seed``,
so every seed scores the same items and the per-item records pair across seeds.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any

import yaml

from retain.config import RunConfig
from retain.errors import RetainError
from retain.evaluation.uncertainty import metric_value, seed_intervals
from retain.io import atomic_write_json, atomic_write_text

AGGREGATE = "aggregate.json"
KEYS = ("AA", "BWT", "FWT", "FM", "probe", "probe_retention")


def seed_dir(run_dir: Path, seed: int) -> Path:
    return Path(run_dir) / f"seed-{seed}"


def seed_config(config: RunConfig, run_dir: Path, seed: int) -> RunConfig:
    return config.model_copy(update={"seeds": None, "seed": seed, "name": f"seed-{seed}",
                                     "output_dir": str(run_dir)})


def aggregate(config: RunConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, standard deviation, per-seed values and the seeds-and-items interval of each metric."""
    metrics = {}
    bounds = seed_intervals(runs)
    for key in KEYS:
        values = [metric_value(r, key) for r in runs]
        if any(v is None for v in values):
            continue
        metrics[key] = {"mean": round(statistics.fmean(values), 4),
                        "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
                        "per_seed": values, "interval": (bounds or {}).get(key)}
    tasks = runs[0]["tasks"]
    R = [[round(statistics.fmean(r["R"][i][j] for r in runs), 4) for j in range(len(tasks))]
         for i in range(len(runs[0]["R"]))]
    return {"name": config.name, "strategy": config.strategy, "stream": config.stream_name,
            "model": config.model, "seeds": [r["seed"] for r in runs], "tasks": tasks,
            "phases": runs[0]["phases"], "R_mean": R, "metrics": metrics,
            "interval_method": "95% percentile bootstrap redrawing the seeds, then each task's test items",
            "runs": [f"seed-{r['seed']}" for r in runs]}


def aggregate_markdown(agg: dict[str, Any]) -> str:
    from retain.reporting.report import fmt, markdown_table

    def span(i):
        return f"[{fmt(i[0])}, {fmt(i[1])}]" if i else "n/a"

    rows = [[key, fmt(m["mean"]), fmt(m["std"]), span(m["interval"]), ", ".join(fmt(v) for v in m["per_seed"])]
            for key, m in agg["metrics"].items()]
    R = [["after " + "+".join(p), *[fmt(v) for v in row]] for p, row in zip(agg["phases"], agg["R_mean"])]
    return "\n".join([
        f"# {agg['name']} over seeds {', '.join(map(str, agg['seeds']))}", "",
        f"model `{agg['model']}` · strategy `{agg['strategy']}` · stream `{agg['stream']}`; one run per seed in "
        f"{', '.join(f'`{r}/`' for r in agg['runs'])}.", "",
        *markdown_table(["metric", "mean", "std (seeds)", "95% interval (seeds and items)", "per seed"], rows), "",
        "## Mean accuracy matrix over seeds", "", *markdown_table(["", *agg["tasks"]], R), "",
        "The interval redraws the seeds and, within each, every task's test items (the same items in every "
        "seed), so it holds both the training noise and the test sample's.", ""])


def prepare_seeds(config: RunConfig, run_dir: Path, *, resume: bool = False, overwrite: bool = False) -> list:
    """Check the config, make the multi-seed folder (emptied unless resuming) and return one job per seed."""
    from retain.dispatch import Job
    from retain.loop import check_run

    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RetainError(f"run directory {run_dir} already exists; resume it with `retain run --resume "
                              f"{run_dir}`, pick another name (name=...), or pass --overwrite")
    check_run(config)  # bad input stops before any seed's folder is touched
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.resolved(), sort_keys=False))
    return [Job(seed_config(config, run_dir, seed), seed_dir(run_dir, seed)) for seed in config.seeds]


def run_seeds(config: RunConfig, *, run_dir: Path | None = None, resume: bool = False, quiet: bool = False,
              overwrite: bool = False, ray=None) -> dict[str, Any]:
    """Every seed of ``config.seeds`` (unfinished ones only when resuming), then the aggregate.
    With ``ray`` (``dispatch.RayOptions``) the unfinished seeds train at once as Ray tasks."""
    from retain.loop import execute, run_dir_for
    from retain.reporting import load_results

    run_dir = Path(run_dir) if run_dir else run_dir_for(config)
    if ray is not None:
        from retain.dispatch import announce, connected, dispatch
        from retain.ui import UI

        with connected(ray):
            jobs = prepare_seeds(config, run_dir, resume=resume, overwrite=overwrite)
            records = dispatch(jobs, ray, announce(UI(quiet=quiet), jobs, ray))
        if records:  # which node trained which seed, and whether it resumed
            atomic_write_json(run_dir / "dispatch.json", records)
    else:
        jobs = prepare_seeds(config, run_dir, resume=resume, overwrite=overwrite)
    runs = []
    for job in jobs:
        if (job.run_dir / "results.json").is_file():
            runs.append(load_results(job.run_dir))
            continue
        again = (job.run_dir / "checkpoints" / "state.json").is_file()
        runs.append(execute(job.config, run_dir=job.run_dir, resume=again, quiet=quiet, overwrite=not again))
    agg = aggregate(config, runs)
    atomic_write_json(run_dir / AGGREGATE, agg)
    atomic_write_text(run_dir / "report.md", aggregate_markdown(agg))
    return agg


def load_seed_runs(run: str | Path) -> list[dict[str, Any]]:
    """The per-seed results of a multi-seed run directory (one element for a plain run)."""
    from retain.reporting import load_results

    path = Path(run)
    if (path / AGGREGATE).is_file():
        import json

        agg = json.loads((path / AGGREGATE).read_text(encoding="utf-8"))
        return [load_results(path / r) for r in agg["runs"]]
    return [load_results(path)]
