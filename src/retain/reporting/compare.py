"""Several runs side by side: one table and one bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retain.io import atomic_write_text
from retain.reporting.report import METRIC_HEADER, markdown_table, metric_rows


def comparison_table(runs: list[dict[str, Any]]) -> str:
    rows = [[r["name"], r["strategy"]] + metric_rows(r)[0] for r in runs]
    return "\n".join(markdown_table(["run", "strategy", *METRIC_HEADER], rows))


def compare_plot(runs: list[dict[str, Any]], path: Path) -> Path:
    from retain.reporting.plots import save_figure, plt

    keys = ["AA", "BWT", "FM"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(runs) + 3), 4))
    width = 0.8 / (len(keys) + 1)
    for k, key in enumerate(keys):
        values = [r["metrics"].get(key) or 0.0 for r in runs]
        ax.bar([i + k * width for i in range(len(runs))], values, width, label=key)
    retention = [(r.get("probe") or {}).get("retention") or 0.0 for r in runs]
    ax.bar([i + len(keys) * width for i in range(len(runs))], retention, width, label="probe retained %")
    ax.set_xticks([i + 1.5 * width for i in range(len(runs))], [r["name"] for r in runs], rotation=20, ha="right")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.set_title("runs compared")
    return save_figure(fig, path)


LABELS = {"AA": "AA", "BWT": "BWT", "FWT": "FWT", "FM": "FM", "probe": "probe final",
          "probe_retention": "probe retained %"}


def paired_table(reference: str, groups: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """Each run's metrics minus the reference's on the same items: difference, paired 95%
    interval and bootstrap p-value; runs that cannot be paired get a line saying why."""
    from retain.errors import RetainError
    from retain.evaluation.uncertainty import paired
    from retain.reporting.report import fmt

    rows, notes, out = [], [], {}
    for name, runs in groups.items():
        if name == reference:
            continue
        try:
            result = paired(runs, groups[reference])
        except RetainError as exc:
            notes.append(f"{exc}.")
            continue
        out[name] = result
        for key, d in result["metrics"].items():
            mark = " *" if d["significant"] else ""
            rows.append([name, LABELS[key], fmt(d["a"]), fmt(d["b"]), fmt(d["difference"], signed=True) + mark,
                         f"[{fmt(d['interval'][0], signed=True)}, {fmt(d['interval'][1], signed=True)}]",
                         f"{d['p']:.3f}"])
    lines = [f"Paired differences against {reference} (same test items; * : the 95% interval excludes 0, "
             "p < 0.05; bootstrap over items, and over seeds for multi-seed runs):", ""]
    lines += markdown_table(["run", "metric", "run", reference, "difference", "95% interval", "p"], rows) if rows else []
    return "\n".join(lines + [""] + notes), out


def compare_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Side by side, then paired against the first run. A multi-seed run (aggregate.json)
    enters the table by its seeds' mean and is paired over seeds and items."""
    from retain.seeds import load_seed_runs

    groups = {}
    for i, r in enumerate(run_dirs, 1):
        runs = load_seed_runs(r)
        key = runs[0]["name"] if len(runs) == 1 else Path(r).name
        groups[key if key not in groups else f"{key} ({i})"] = runs
    shown = [_mean_run(name, runs) for name, runs in groups.items()]
    table = comparison_table(shown)
    text = table
    if len(groups) > 1:
        pairs, data = paired_table(next(iter(groups)), groups)
        text = f"{table}\n\n{pairs}"
    if out is not None:
        out = Path(out)
        compare_plot(shown, out / "compare.png")
        atomic_write_text(out / "compare.md", f"# Comparison\n\n{text}\n\n![comparison](compare.png)\n")
        if len(groups) > 1:
            from retain.io import atomic_write_json

            atomic_write_json(out / "paired.json", data)
    return text, shown


def _mean_run(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for the table: a single run as it is, several seeds by their means."""
    if len(runs) == 1:
        return runs[0]
    from retain.evaluation.uncertainty import mean_value as mean

    probe = dict(runs[0].get("probe") or {})
    if probe:
        probe["base"] = sum(r["probe"]["base"] for r in runs) / len(runs)
        probe["after_phase"] = [mean(runs, "probe")]
        probe["retention"] = mean(runs, "probe_retention")
    return {**runs[0], "name": f"{name} (mean of {len(runs)} seeds)", "intervals": None, "probe": probe,
            "metrics": {k: mean(runs, k) for k in ("AA", "BWT", "FWT", "FM")},
            "wall_s": sum(r.get("wall_s") or 0 for r in runs)}
