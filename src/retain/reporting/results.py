"""Assemble and read results.json, the one file every report and comparison is built from."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from retain import __version__
from retain.errors import RetainError
from retain.io import atomic_write_json
from retain.metrics import summarize

log = logging.getLogger(__name__)
SCHEMA = 1


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def scored_records(results: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """The run's update-analysis records that scored the tasks, each with its mean task score."""
    return [(sum(u["scores"].values()) / len(u["scores"]), u) for u in results.get("updates") or [] if u.get("scores")]


def build_results(config, stream, state: dict[str, Any]) -> dict[str, Any]:
    R = [[_r(v) for v in row] for row in state["R"]]
    base = [_r(v) for v in state["base"]]
    metrics = summarize(R, base) if R else {}
    base_probe = state.get("base_probe")
    probe_after = [_r(p) for p in state.get("probe", [])]
    probe = None
    if base_probe is not None:
        final = probe_after[-1] if probe_after else None
        probe = {
            "base": _r(base_probe), "after_phase": probe_after,
            "change": _r(final - base_probe) if final is not None else None,
            "retention": _r(100.0 * final / base_probe) if final is not None and base_probe else None,
        }
    timings = state.get("timings", [])
    evaluations = state.get("evaluations") or []
    names = stream.task_names

    def stderr_row(scores: dict) -> list:
        return [_r(scores.get(n, {}).get("stderr")) for n in names]
    tokens = sum(t["tokens"] for t in timings)
    train_s = sum(t["train_s"] for t in timings)
    return {
        "schema": SCHEMA,
        "retain_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "name": config.name,
        "model": config.model,
        "strategy": config.strategy,
        "stream": config.stream or "custom",
        "seed": config.seed,
        "tasks": stream.task_names,
        "task_metrics": {t.name: t.metric for t in stream.tasks},
        "phases": state.get("phases", []),
        "R": R,
        "base": base,
        "metrics": {k: _r(v) for k, v in metrics.items()},
        # Standard errors (points) of R and b; every evaluation's acc / acc_norm per task.
        "R_stderr": [stderr_row(e["scores"]) for e in evaluations[1:]],
        "base_stderr": stderr_row(evaluations[0]["scores"]) if evaluations else None,
        "task_scoring": {t.name: ("acc_norm" if t.choice_norm else "acc") if t.metric == "choice" else t.metric
                         for t in stream.tasks},
        "evaluations": evaluations,
        # Which test items a capped split kept (seeded, stratified by label).
        "eval_samples": {t.name: t.sample.to_dict() for t in
                         stream.tasks + ([stream.probe] if stream.probe else []) if t.sample is not None},
        "probe": probe,
        "timings": timings,
        "strategy_stats": state.get("strategy_stats", []),
        "train_s": _r(train_s, 3),
        "train_tokens": tokens,
        "train_tokens_per_s": _r(tokens / train_s, 1) if train_s else None,
        "wall_s": state.get("wall_s"),
        "peak_memory_mb": state.get("peak_memory_mb"),
        "updates": state.get("updates", []),
        # Per-task methods: scores with the task predicted from the input (task-agnostic).
        "routing": state.get("routing"),
        # Strategies' evaluations after the last phase (e.g. merged adapters), by strategy.
        "final": state.get("final", {}),
    }


def finalize(run_dir: Path, config, stream, state: dict[str, Any]) -> dict[str, Any]:
    """Write results.json, then the report (a failing plot never costs the results)."""
    from retain.reporting.report import write_report

    results = build_results(config, stream, state)
    atomic_write_json(Path(run_dir) / "results.json", results)
    try:
        write_report(run_dir, results)
    except Exception as exc:  # noqa: BLE001 - the results are already safe on disk
        log.warning("report could not be written: %s (results.json is complete)", exc)
    return results


def load_results(run: str | Path) -> dict[str, Any]:
    path = Path(run)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise RetainError(f"{path} not found: is {run} a finished run directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RetainError(f"{path}: not valid JSON ({exc.msg})") from None
    if data.get("schema") != SCHEMA:
        raise RetainError(f"{path}: unsupported results schema {data.get('schema')!r} (expected {SCHEMA})")
    return data
