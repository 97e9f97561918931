"""Time per training step under DP-SGD against the same training without it, side by side.

Each round runs ``configs/lora-replay.yaml`` and ``configs/private-lora-replay.yaml`` (epsilon 4)
on ``numbers`` as ``retain run`` does, one process each, alternating, with a short budget per
task and evaluation cut to a few items (the figure is training time per step from each run's
timings, which leaves evaluation out). Both run at the same thread count.

    .venv/bin/python benchmarks/private_step.py [--rounds 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, write

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"plain": "lora-replay", "dp-eps4": "private-lora-replay"}


def seconds_per_step(config: str, steps: int, out: Path) -> float:
    retain = str(Path(sys.executable).parent / "retain")
    subprocess.run([retain, "run", str(ROOT / "configs" / f"{config}.yaml"), f"name={config}",
                    f"output_dir={out}", f"train.max_steps={steps}", "train.warmup_steps=2", "eval.max_test=4",
                    "eval.probe=false", "eval.membership=0", "--overwrite", "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    timings = json.loads((out / config / "results.json").read_text())["timings"]
    return sum(t["train_s"] for t in timings) / sum(t["steps"] for t in timings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="steps per task (4 tasks)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            row = {name: round(seconds_per_step(config, args.steps, Path(tmp)), 4) for name, config in SETTINGS.items()}
            row["ratio"] = round(row["dp-eps4"] / row["plain"], 3)
            rows.append(row)
            print(f"round {r}: {row}", flush=True)
    med = {k: statistics.median(row[k] for row in rows) for k in ("plain", "dp-eps4")}
    ratio = round(med["dp-eps4"] / med["plain"], 3)
    m = machine()
    md = "\n".join([
        "# Time per step under DP-SGD", "",
        f"{m['device']}, {m['torch_threads']} threads, {m['date']}; `configs/lora-replay.yaml` against "
        f"`configs/private-lora-replay.yaml` (epsilon 4 per phase, Opacus, Poisson batches of expected size 8) on "
        f"`numbers`, {args.steps} steps per task, 4 tasks, {args.rounds} alternating rounds, one process per run; "
        "training seconds per step from each run's timings.", "",
        "| round | plain s/step | DP-SGD s/step | ratio |", "|---|---|---|---|",
        *[f"| {i} | {r['plain']} | {r['dp-eps4']} | {r['ratio']} |" for i, r in enumerate(rows)],
        f"| median | {med['plain']:.4f} | {med['dp-eps4']:.4f} | **{ratio}** |", ""])
    write("private-step", {"machine": m, "steps_per_task": args.steps, "rounds": rows, "median": med,
                           "ratio": ratio}, md)


if __name__ == "__main__":
    main()
