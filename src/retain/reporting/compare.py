"""Several runs side by side: one table and one bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retain.io import atomic_write_text
from retain.reporting.report import METRIC_HEADER, markdown_table, metric_rows
from retain.reporting.results import load_results


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


def compare_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> tuple[str, list[dict[str, Any]]]:
    runs = [load_results(r) for r in run_dirs]
    table = comparison_table(runs)
    if out is not None:
        out = Path(out)
        compare_plot(runs, out / "compare.png")
        atomic_write_text(out / "compare.md", f"# Comparison\n\n{table}\n\n![comparison](compare.png)\n")
    return table, runs
