"""Assemble and read results.json, the one file every report and comparison is built from."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from retain import __version__
from retain.errors import RetainError
from retain.io import atomic_write_json
from retain.evaluation.uncertainty import intervals
from retain.metrics import summarize
from retain.reporting.forgotten import forgotten_examples

log = logging.getLogger(__name__)
SCHEMA = 1


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def scored_records(results: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """The run's update-analysis records that scored the tasks, each with its mean task score."""
    return [(sum(u["scores"].values()) / len(u["scores"]), u) for u in results.get("updates") or [] if u.get("scores")]


def _trajectory(base: float | None, after: list[float | None]) -> dict[str, Any]:
    final = after[-1] if after else None
    return {"base": _r(base), "after_phase": [_r(v) for v in after],
            "change": _r(final - base) if final is not None and base is not None else None,
            "retention": _r(100.0 * final / base) if final is not None and base else None}


def probe_block(stream, state: dict[str, Any]) -> dict[str, Any] | None:
    """The probes' mean over the run (``base``, ``after_phase``, ``change``, ``retention``) and
    each probe on its own under ``suites``, with its chance level: a score near chance after
    training says as little as one near chance before it."""
    if state.get("base_probe") is None:
        return None
    block = _trajectory(state["base_probe"], state.get("probe", []))
    evaluations = state.get("evaluations") or []
    suites = {}
    for task in stream.probes:
        values = [e["scores"].get(task.name, {}).get("value") for e in evaluations]
        if not values or values[0] is None:
            continue
        scoring = ("acc_norm" if task.choice_norm else "acc") if task.metric == "choice" else task.metric
        stderr = [e["scores"][task.name].get("stderr") for e in evaluations]
        suites[task.name] = {**_trajectory(values[0], values[1:]), "chance": _r(task.chance), "n": len(task.test),
                             "scoring": scoring, "stderr": [_r(v) for v in stderr]}
    return {**block, "names": list(suites), "suites": suites}


def item_ids(tasks) -> dict[str, str]:
    """A fingerprint of each task's test items (input, answer, options, in order): two runs
    pair item by item only when these are equal."""
    out = {}
    for task in tasks:
        digest = hashlib.sha256()
        for ex in task.test:
            digest.update(json.dumps([ex.input, ex.output, ex.options], ensure_ascii=False).encode("utf-8"))
        out[task.name] = digest.hexdigest()[:16]
    return out


def build_results(config, stream, state: dict[str, Any]) -> dict[str, Any]:
    R = [[_r(v) for v in row] for row in state["R"]]
    base = [_r(v) for v in state["base"]]
    metrics = summarize(R, base) if R else {}
    probe = probe_block(stream, state)
    if config.stream_name == "trace" and "AA" in metrics:
        metrics["OP"] = metrics["AA"]  # TRACE's overall performance: the mean final score
    timings = state.get("timings", [])
    evaluations = state.get("evaluations") or []
    names = stream.task_names

    def stderr_row(scores: dict) -> list:
        return [_r(scores.get(n, {}).get("stderr")) for n in names]
    tokens = sum(t["tokens"] for t in timings)
    train_s = sum(t["train_s"] for t in timings)
    results = {
        "schema": SCHEMA,
        "retain_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "name": config.name,
        "model": config.model,
        "strategy": config.strategy,
        "stream": config.stream_name,
        "stream_order": stream.order,
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
        "eval_samples": {t.name: t.sample.to_dict() for t in stream.tasks + stream.probes if t.sample is not None},
        "probe": probe,
        "item_ids": item_ids(stream.tasks + stream.probes),
        # Items right after their task and wrong at the end, with both answers (probes: base vs end).
        "examples": forgotten_examples(stream, state),
        "timings": timings,
        "strategy_stats": state.get("strategy_stats", []),
        "train_s": _r(train_s, 3),
        "train_tokens": tokens,
        "train_tokens_per_s": _r(tokens / train_s, 1) if train_s else None,
        "wall_s": state.get("wall_s"),
        "peak_memory_mb": state.get("peak_memory_mb"),
        "num_processes": state.get("num_processes", 1),
        "sharding": state.get("sharding"),
        # The arithmetic the run trained and scored in ("no": fp32), so figures of different
        # precisions are not put side by side unmarked.
        "precision": config.train.precision,
        "updates": state.get("updates", []),
        # Per-task methods: scores with the task predicted from the input (task-agnostic).
        "routing": state.get("routing"),
        # Strategies' evaluations after the last phase (e.g. merged adapters), by strategy.
        "final": state.get("final", {}),
    }
    if state.get("online"):
        from retain.online import shifts, summary

        # Online mode: the anytime curve, prequential scores, hidden boundaries, AAA.
        results["online"] = {**state["online"], **summary(state["online"]),
                             "shifts": shifts(state["online"], state.get("strategy_stats") or [],
                                              config.train.batch_size)}
        results["metrics"]["AAA"] = results["online"]["AAA"]
        results["metrics"]["online_accuracy"] = results["online"]["online_accuracy"]
    if config.privacy is not None:
        from retain.privacy import PrivateTraining

        # DP-SGD: epsilon per phase, per task over the stream (replays included), in total.
        results["privacy"] = PrivateTraining(config).summary(timings)
        results["metrics"]["epsilon"] = results["privacy"]["epsilon"]
    if state.get("federated"):
        fed = state["federated"]
        # The clients' scores of their own last local model (rows: phases), and each round's clients.
        from retain.federated import client_level_epsilon

        results["federated"] = {**config.federated.model_dump(), "client_R": fed["client_R"],
                                "phases": fed["phases"]}
        if config.federated.dp is not None:
            results["federated"]["dp"] = client_level_epsilon(config, fed["phases"])
            results["metrics"]["epsilon"] = results["federated"]["dp"]["epsilon"]
    if state.get("membership"):
        results["membership"] = state["membership"]
        final = state["membership"].get("final") or {}
        if final.get("auc") is not None:
            results["metrics"]["membership_auc"] = final["auc"]
    results["intervals"] = intervals(results)
    return results


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
