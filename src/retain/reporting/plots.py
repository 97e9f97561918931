"""Matplotlib figures of a run: the accuracy-matrix heatmap and per-task curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from retain.io import atomic_write  # noqa: E402
from retain.reporting.results import scored_records  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def heatmap(results: dict[str, Any], path: Path) -> Path:
    tasks, R = results["tasks"], results["R"]
    rows = [results["base"]] + R
    labels = ["base"] + ["after " + "+".join(p) if len(p) > 1 else f"after {p[0]}" for p in results["phases"]]
    fig, ax = plt.subplots(figsize=(1.3 * len(tasks) + 2.5, 0.55 * len(rows) + 1.5))
    im = ax.imshow(rows, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.set_title(f"{results['name']}: score R[i][j]")
    fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def curves(results: dict[str, Any], path: Path) -> Path:
    tasks, R = results["tasks"], results["R"]
    x = list(range(len(R) + 1))
    fig, ax = plt.subplots(figsize=(7, 4))
    ci = results.get("intervals") or {}
    for j, name in enumerate(tasks):
        ys = [results["base"][j]] + [row[j] for row in R]
        bounds = [(ci.get("base") or [None] * len(tasks))[j]] + [row[j] for row in ci.get("R") or []]
        if ci and all(b is not None for b in bounds) and len(bounds) == len(ys):
            # 95% intervals as error bars (Wilson for accuracies: asymmetric)
            err = [[y - b[0] for y, b in zip(ys, bounds)], [b[1] - y for y, b in zip(ys, bounds)]]
            ax.errorbar(x, ys, yerr=err, marker="o", capsize=3, label=name)
        else:
            ax.plot(x, ys, marker="o", label=name)
    probe = results.get("probe")
    if probe:
        label = "probe" if len(probe.get("suites") or {}) <= 1 else "probes (mean)"
        ax.plot(x, [probe["base"]] + probe["after_phase"], "k--", marker="s", label=label)
    ax.set_xticks(x, ["base"] + [f"+{'+'.join(p)}" for p in results["phases"]], rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_title(f"{results['name']}: scores after each phase")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def online(results: dict[str, Any], path: Path) -> Path:
    """Online mode: every task's score against examples seen, the hidden boundaries marked,
    and where a strategy said the stream shifted."""
    o = results["online"]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = [0] + [c["examples"] for c in o["curve"]]
    for j, name in enumerate(results["tasks"]):
        ax.plot(xs, [results["base"][j]] + [c["scores"][j] for c in o["curve"]], marker=".", label=name)
    ax.plot(xs[1:], [c["seen_mean"] for c in o["curve"]], "k-", linewidth=2, label="mean over tasks seen")
    for b in o["boundaries"][:-1]:
        ax.axvline(b, color="grey", linestyle="--", linewidth=1)
    for s in o.get("shifts") or []:
        ax.axvline(s, color="red", linestyle=":", linewidth=1)
    ax.set_xlabel("examples seen (dashed: hidden task boundaries" + ("; dotted: detected shifts)"
                                                                      if o.get("shifts") else ")"))
    ax.set_ylabel("score")
    ax.set_title(f"{results['name']}: anytime evaluation (AAA {o['AAA']:.1f})" if o.get("AAA") is not None
                 else f"{results['name']}: anytime evaluation")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def updates(results: dict[str, Any], path: Path) -> Path:
    """||dW|| / ||W0|| and KL to the base against training step; the probe against ||dW||."""
    recs = results["updates"]
    steps = [r["global_step"] for r in recs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, [r["norm"]["rel"] for r in recs], marker="o", label="||dW|| / ||W0||")
    if any("kl_base" in r for r in recs):
        twin = left.twinx()
        twin.plot([r["global_step"] for r in recs if "kl_base" in r], [r["kl_base"] for r in recs if "kl_base" in r],
                  "r--", marker="x", label="KL(fine-tuned || base)")
        twin.set_ylabel("KL to base (nats)", color="r")
    left.set_xlabel("training step")
    left.set_ylabel("relative update norm")
    left.grid(alpha=0.3)
    left.set_title("update size")
    probed = [r for r in recs if r.get("probe") is not None]
    right.plot([r["norm"]["abs"] for r in probed], [r["probe"] for r in probed], marker="o")
    right.set_xlabel("||dW||_F")
    right.set_ylabel("probe score")
    right.grid(alpha=0.3)
    right.set_title("general ability against update norm")
    fig.suptitle(results["name"])
    return save_figure(fig, path)


def study(runs: list[dict[str, Any]], path: Path) -> Path:
    """Per arm: target score and probe against step, and probe against ||dW||."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    for r in runs:
        recs = scored_records(r)
        steps = [0] + [u["global_step"] for _, u in recs]
        target = [sum(r["base"]) / len(r["base"])] + [score for score, _ in recs]
        a.plot(steps, target, marker="o", label=r["name"])
        probed = [u for u in r.get("updates", []) if u.get("probe") is not None]
        base_probe = (r.get("probe") or {}).get("base")
        if base_probe is not None:
            b.plot([0] + [u["global_step"] for u in probed], [base_probe] + [u["probe"] for u in probed],
                   marker="o", label=r["name"])
            c.plot([0.0] + [u["norm"]["abs"] for u in probed], [base_probe] + [u["probe"] for u in probed],
                   marker="o", label=r["name"])
    for ax, (x, y, title) in zip((a, b, c), [("step", "target score", "target score"),
                                             ("step", "probe score", "general ability"),
                                             ("||dW||_F", "probe score", "general ability against update norm")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8, loc="best")
    return save_figure(fig, path)
