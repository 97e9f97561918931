"""How sure a run's figures are: per-item records, intervals, paired differences.

Every evaluation keeps each test item's score (``items`` in results.json), so every cell of
R, the probes and the metrics built from them can be re-derived and resampled without the
model. Intervals are 95%:

- a cell that is an accuracy (items scored 0 or 100): the Wilson score interval, which stays
  inside [0, 100] and is right at small n where the normal interval is not;
- any other cell, and AA, BWT, FWT, FM and the probes: a percentile bootstrap over test
  items. One resample of a task's items is used in every row of R at once (the same items
  are scored after every phase), so BWT and FM, which subtract cells of the same task, see
  the correlation between those cells instead of treating them as independent.

Bootstraps use numpy's generator with a fixed seed: the same results give the same intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from retain.errors import RetainError
from retain.metrics import summarize

Z95 = 1.959963984540054
REPS = 2000
LEVEL = 0.95


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``hits``/``n``, in points."""
    if n <= 0:
        return None
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100.0 * max(centre - half, 0.0), 100.0 * min(centre + half, 1.0)


def percentile(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """The central ``level`` interval of bootstrap samples (NaNs, from undefined metrics, dropped)."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


# -- compact per-item records ------------------------------------------------------------
def encode(values: Sequence[float]) -> str | list[float]:
    """Accuracies as a string of 0/1 (one character per item); other scores as rounded numbers."""
    if all(v in (0.0, 100.0) for v in values):
        return "".join("1" if v else "0" for v in values)
    return [round(float(v), 3) for v in values]


def decode(record: str | Sequence[float]) -> np.ndarray:
    if isinstance(record, str):
        return np.frombuffer(record.encode("ascii"), dtype=np.uint8).astype(float) * 100.0 - 4800.0
    return np.asarray(record, dtype=float)


#: Generated answers are kept up to this many characters: enough to read what changed.
ANSWER_CHARS = 200


def item_record(score) -> dict[str, Any]:
    """One task's items in one evaluation, for results.json: scores and answers."""
    answers = [a if isinstance(a, int) else a[:ANSWER_CHARS] for a in score.predictions]
    return {"scores": encode(score.items), "answers": answers}


def is_accuracy(record: Any) -> bool:
    return isinstance(record, str)


@dataclass
class ItemTable:
    """Per-item scores of one task in every evaluation: rows = base, after phase 1, ...;
    columns = test items."""

    name: str
    values: np.ndarray
    accuracy: bool

    @property
    def n(self) -> int:
        return self.values.shape[1]


def item_tables(results: dict[str, Any], names: Sequence[str]) -> dict[str, ItemTable] | None:
    """The per-item tables of ``names`` (tasks or probes); None when a run predates item
    records or a task has none (perplexity)."""
    evaluations = results.get("evaluations") or []
    out = {}
    for name in names:
        rows = [(e.get("items") or {}).get(name) for e in evaluations]
        if not rows or any(r is None for r in rows):
            return None
        scores = [r["scores"] for r in rows]
        out[name] = ItemTable(name, np.stack([decode(s) for s in scores]), is_accuracy(scores[0]))
    return out


def _counts(rng: np.random.Generator, n: int, reps: int) -> np.ndarray:
    """How often each item is drawn in each resample: (reps, n), rows summing to n."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=reps)


def resampled_means(tables: dict[str, ItemTable], reps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each table's row means under ``reps`` resamples of its items: (reps, rows)."""
    out = {}
    for name, t in tables.items():
        counts = _counts(rng, t.n, reps)
        out[name] = counts @ t.values.T / t.n
    return out


def metric_samples(means: dict[str, np.ndarray], tasks: Sequence[str], probes: Sequence[str]) -> dict[str, np.ndarray]:
    """AA, BWT, FWT, FM and the probes' mean and retention in each resample."""
    reps = next(iter(means.values())).shape[0]
    keys = ("AA", "BWT", "FWT", "FM")
    out = {k: np.full(reps, np.nan) for k in (*keys, "probe", "probe_retention")}
    for b in range(reps):
        base = [means[t][b, 0] for t in tasks]
        R = [[means[t][b, i] for t in tasks] for i in range(1, means[tasks[0]].shape[1])]
        m = summarize(R, base) if R else {}
        for k in keys:
            if m.get(k) is not None:
                out[k][b] = m[k]
    if probes:
        rows = np.mean([means[p] for p in probes], axis=0)  # (reps, rows): the probes' mean
        out["probe"] = rows[:, -1]
        with np.errstate(divide="ignore", invalid="ignore"):
            out["probe_retention"] = np.where(rows[:, 0] > 0, 100.0 * rows[:, -1] / rows[:, 0], np.nan)
    return out


def _pair(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [round(interval[0], 4), round(interval[1], 4)]


def intervals(results: dict[str, Any], reps: int = REPS, seed: int = 0) -> dict[str, Any] | None:
    """95% intervals of every cell of R and b, of the metrics and of the probes."""
    tasks = results["tasks"]
    probes = list((results.get("probe") or {}).get("names") or [])
    tables = item_tables(results, [*tasks, *probes])
    if tables is None or not results.get("R"):
        return None
    rng = np.random.default_rng(seed)
    means = resampled_means(tables, reps, rng)

    def cell(name: str, row: int) -> list[float] | None:
        t = tables[name]
        if t.accuracy:
            return _pair(wilson(int(round(t.values[row].sum() / 100)), t.n))
        return _pair(percentile(means[name][:, row]))

    samples = metric_samples(means, tasks, probes)
    rows = tables[tasks[0]].values.shape[0]
    return {
        "level": LEVEL, "reps": reps, "seed": seed,
        "method": "Wilson for accuracy cells; percentile bootstrap over test items (one resample per task "
                  "shared by every row) for other cells and for the metrics",
        "base": [cell(t, 0) for t in tasks],
        "R": [[cell(t, i) for t in tasks] for i in range(1, rows)],
        "metrics": {k: _pair(percentile(samples[k])) for k in ("AA", "BWT", "FWT", "FM")},
        "probe": {"final": _pair(percentile(samples["probe"])) if probes else None,
                  "retention": _pair(percentile(samples["probe_retention"])) if probes else None,
                  "suites": {p: {"base": cell(p, 0), "final": cell(p, rows - 1)} for p in probes}},
    }


# -- paired comparison -------------------------------------------------------------------
def same_items(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """Why two runs cannot be paired item by item (None: they can)."""
    if a["tasks"] != b["tasks"]:
        return f"their tasks differ ({', '.join(a['tasks'])} vs {', '.join(b['tasks'])})"
    fa, fb = a.get("item_ids") or {}, b.get("item_ids") or {}
    for name in a["tasks"] + list((a.get("probe") or {}).get("names") or []):
        if name not in fa or name not in fb:
            return f"'{name}' has no item record in one of them (results written before retain recorded items)"
        if fa[name] != fb[name]:
            return f"their test items of '{name}' differ (another sample, cap or data file)"
    return None


def paired(runs_a: Sequence[dict], runs_b: Sequence[dict], reps: int = REPS, seed: int = 0) -> dict[str, Any]:
    """Each metric's difference A - B on the same items, with a paired 95% interval and a
    two-sided bootstrap p-value. With several seeds per side, each resample also draws the
    seeds (with replacement) and averages the runs it drew, so the interval holds both
    the items' and the seeds' variation."""
    first = runs_a[0]
    for other in (*runs_a[1:], *runs_b):
        why = same_items(first, other)
        if why:
            raise RetainError(f"cannot pair {first['name']} with {other['name']}: {why}")
    tasks = first["tasks"]
    probes = [p for p in (first.get("probe") or {}).get("names") or []
              if all(p in ((r.get("probe") or {}).get("names") or []) for r in (*runs_a, *runs_b))]
    tables = {id(r): item_tables(r, [*tasks, *probes]) for r in (*runs_a, *runs_b)}
    if any(t is None for t in tables.values()):
        raise RetainError("cannot pair runs without per-item records (results written before retain recorded "
                          "items, or a perplexity task)")
    rng = np.random.default_rng(seed)
    names = [*tasks, *probes]
    counts = {n: _counts(rng, tables[id(first)][n].n, reps) for n in names}
    sa = _over_runs(runs_a, tables, names, counts, rng, tasks, probes)
    sb = _over_runs(runs_b, tables, names, counts, rng, tasks, probes)
    out = {}
    for key in ("AA", "BWT", "FWT", "FM", "probe", "probe_retention"):
        point_a = mean_value(runs_a, key)
        point_b = mean_value(runs_b, key)
        if point_a is None or point_b is None:
            continue
        diff = sa[key] - sb[key]
        diff = diff[~np.isnan(diff)]
        if diff.size == 0:
            continue
        p = min(1.0, 2 * min(float(np.mean(diff <= 0)), float(np.mean(diff >= 0))))
        lo, hi = percentile(diff)
        out[key] = {"a": round(point_a, 4), "b": round(point_b, 4), "difference": round(point_a - point_b, 4),
                    "interval": [round(lo, 4), round(hi, 4)], "p": round(p, 4),
                    "significant": bool(p < 1 - LEVEL)}
    return {"level": LEVEL, "reps": reps, "seed": seed, "a": [r["name"] for r in runs_a],
            "b": [r["name"] for r in runs_b], "metrics": out}


def _over_runs(runs: Sequence[dict], tables: dict, names: Sequence[str], counts: dict[str, np.ndarray],
               rng: np.random.Generator, tasks: Sequence[str], probes: Sequence[str]) -> dict[str, np.ndarray]:
    """Metric samples when each resample draws the runs (seeds) with replacement and the items
    by ``counts``, averaging the drawn runs' row means."""
    reps = next(iter(counts.values())).shape[0]
    picks = rng.integers(0, len(runs), size=(reps, len(runs))) if len(runs) > 1 else np.zeros((reps, 1), int)
    means = {}
    for n in names:
        per_run = np.stack([counts[n] @ tables[id(r)][n].values.T / tables[id(r)][n].n for r in runs])
        means[n] = per_run[picks, np.arange(reps)[:, None]].mean(axis=1)  # (reps, rows)
    return metric_samples(means, tasks, probes)


def seed_intervals(runs: Sequence[dict], reps: int = REPS, seed: int = 0) -> dict[str, list[float]] | None:
    """95% intervals of the metrics over seeds and items together (None without item records)."""
    tasks = runs[0]["tasks"]
    probes = list((runs[0].get("probe") or {}).get("names") or [])
    tables = {id(r): item_tables(r, [*tasks, *probes]) for r in runs}
    if any(t is None for t in tables.values()) or any(same_items(runs[0], r) for r in runs[1:]):
        return None
    rng = np.random.default_rng(seed)
    names = [*tasks, *probes]
    counts = {n: _counts(rng, tables[id(runs[0])][n].n, reps) for n in names}
    samples = _over_runs(runs, tables, names, counts, rng, tasks, probes)
    return {k: _pair(percentile(v)) for k, v in samples.items()}


def metric_value(results: dict[str, Any], key: str) -> float | None:
    """A run's point figure for ``key``: a metric, the probes' final mean or their retention."""
    probe = results.get("probe") or {}
    if key == "probe":
        return (probe.get("after_phase") or [None])[-1]
    if key == "probe_retention":
        return probe.get("retention")
    return (results.get("metrics") or {}).get(key)


def mean_value(runs: Sequence[dict], key: str) -> float | None:
    """``metric_value`` averaged over runs (seeds); None when one run lacks it."""
    values = [metric_value(r, key) for r in runs]
    return None if any(v is None for v in values) else sum(values) / len(values)
