"""The field's published tables, re-measured on the embedded model: ``standard-cl`` and ``trace``.

Each method is its shipped config (``configs/<config>.yaml``: the method's own learning rate
and options) pointed at the named stream with the same budget for every method: the same
steps per task, train items, test items and probes. Runs go one after another, each in its
own process, exactly as ``retain run`` runs them. Resumable: a finished run's results are
kept in ``benchmarks/results/<suite>/``; a killed run continues from its last checkpoint
(``retain run --resume``), so a session that ends mid-run loses at most a few steps.

    .venv/bin/python benchmarks/published.py --suite standard-cl [--only naive,lora]
    .venv/bin/python benchmarks/published.py --suite standard-cl --summarize-only
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, machine, runs_dir, write
from retain.io import atomic_write_json
from retain.reporting import load_results
from retain.reporting.report import fmt

ROOT = Path(__file__).resolve().parents[1]

#: run name -> (config, the published row it re-measures)
METHODS = {
    "standard-cl": {
        "naive": ("naive", "SeqFT"), "lora": ("lora", "SeqLoRA"), "lora-replay": ("lora-replay", "Replay"),
        "olora": ("olora", "O-LoRA"), "lora-per-task": ("lora-per-task", "PerTaskFT"), "joint": ("joint", "MTL"),
        "ewc-online": ("ewc-online", "EWC"), "lwf": ("lwf", "LwF"), "l2p": ("l2p", "L2P"),
    },
    "trace": {"naive": ("naive", "SeqFT"), "lora": ("lora", "LoRA"), "lora-replay": ("lora-replay", "Replay"),
              "olora": ("olora", "O-LoRA")},
}
#: Published figures. standard-cl: O-LoRA (Wang et al. 2023), T5-large, order 1, AA.
#: trace: TRACE (Wang et al. 2023), LLaMA-2-7B-Chat, OP / BWT.
PUBLISHED = {
    "standard-cl": {"SeqFT": "18.9", "SeqLoRA": "44.6", "O-LoRA": "75.4", "PerTaskFT": "70.0", "MTL": "80.0"},
    "trace": {"SeqFT": "48.7 / -8.3", "LoRA": "12.7 / -45.7", "Replay": "55.5 / +2.6"},
}
#: The same budget for every method (per task). bf16 mixed precision: on a CPU with bf16
#: instructions (AVX512-BF16) it halves a run's time (benchmarks/results/cpu-precision.md); on an
#: AVX2-only CPU it is ~5x slower than fp32 (cpu-precision-matmul.md), so there ``--precision fp32``
#: runs it in fp32 and the table marks each run's precision.
BUDGET = {
    "standard-cl": {"steps": 40, "max_train": 400, "max_test": 30, "probe_max": 30, "precision": "bf16"},
    "trace": {"steps": 40, "max_train": 400, "max_test": 20, "probe_max": 30, "eval_max_length": 1024,
              "precision": "bf16"},
}
PROBES = "[arc-easy,piqa,hellaswag,mmlu]"


def overrides(suite: str, name: str, budget: dict) -> list[str]:
    return [f"name={name}", f"stream.name={suite}", f"stream.max_train={budget['max_train']}",
            f"stream.max_test={budget['max_test']}", f"train.max_steps={budget['steps']}", "train.warmup_steps=4",
            f"eval.probe={PROBES}", f"eval.probe_max={budget['probe_max']}", "train.checkpoint_every=10",
            f"train.precision={'no' if budget['precision'] == 'fp32' else budget['precision']}",
            *([f"eval.max_length={budget['eval_max_length']}"] if "eval_max_length" in budget else [])]


def run(suite: str, name: str, config: str, budget: dict, out: Path) -> dict:
    run_dir = out / suite / name
    retain = str(Path(sys.executable).parent / "retain")
    if (run_dir / "checkpoints" / "state.json").is_file() and not (run_dir / "results.json").is_file():
        cmd = [retain, "run", "--resume", str(run_dir), "--quiet"]
    else:
        cmd = [retain, "run", str(ROOT / "configs" / f"{config}.yaml"), *overrides(suite, name, budget),
               f"output_dir={out / suite}", "--overwrite", "--quiet"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return load_results(run_dir)


def precision_of(r: dict) -> str:
    """fp32 or bf16; results written before results.json recorded it ran under the budget's bf16."""
    precision = r.get("precision", "bf16")
    return "fp32" if precision == "no" else precision


def table(suite: str, results: dict) -> list[str]:
    probes = PROBES.strip("[]").split(",")
    head = ["run", "strategy", "paper's method", "published", "AA", "BWT", "FM", *[f"{p} base→final" for p in probes],
            "precision", "wall s"]
    rows = []
    for name, (_, paper) in METHODS[suite].items():
        if name not in results:
            rows.append([name, "", paper, PUBLISHED[suite].get(paper, "-"), "not yet measured", "", "",
                         *[""] * (len(probes) + 2)])
            continue
        r = results[name]
        m, suites = r["metrics"], (r.get("probe") or {}).get("suites", {})
        cells = [f"{fmt(suites[p]['base'])}→{fmt(suites[p]['after_phase'][-1])}" if p in suites else "-"
                 for p in probes]
        rows.append([name, f"`{r['strategy']}`", paper, PUBLISHED[suite].get(paper, "-"), fmt(m.get("AA")),
                     fmt(m.get("BWT"), signed=True), fmt(m.get("FM")), *cells, precision_of(r),
                     fmt(r.get("wall_s"), 0)])
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *["| " + " | ".join(c) + " |" for c in rows]]


def paired(results: dict) -> list[str]:
    """Every method against naive (SeqFT) on the same test and probe items: which gaps one seed
    can resolve."""
    from retain.reporting.compare import paired_table

    if "naive" not in results or len(results) < 2:
        return []
    table, _ = paired_table("naive", {n: [r] for n, r in results.items()})
    return [table, "", "One seed: the intervals resample test items, not seeds.", ""]


def matrices(results: dict) -> list[str]:
    lines = []
    for name, r in results.items():
        lines += [f"**{name}** (`{r['strategy']}`): R, rows after each task", "",
                  "| | " + " | ".join(r["tasks"]) + " |", "|---|" + "---|" * len(r["tasks"]),
                  "| base | " + " | ".join(fmt(v) for v in r["base"]) + " |"]
        lines += [f"| +{'+'.join(p)} | " + " | ".join(fmt(v) for v in row) + " |"
                  for p, row in zip(r["phases"], r["R"])]
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(METHODS), default="standard-cl")
    ap.add_argument("--only", default=None, help="comma-separated subset of the suite's runs")
    ap.add_argument("--out", default=str(runs_dir("published")),
                    help="run directories (default: $RETAIN_BENCH_DIR/published or ~/.cache/retain/bench/published)")
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                    help="override the budget's bf16 (needed on a CPU without native bf16, where it is ~5x slower)")
    args = ap.parse_args()
    budget = {**BUDGET[args.suite], **({"precision": args.precision} if args.precision else {})}
    m = machine()
    if budget["precision"] == "bf16" and m["device"] == "cpu" and not m["cpu_native_bf16"] and not args.summarize_only:
        sys.exit(f"this CPU ({m['cpu']}, {m['cpu_capability']}) has no native bf16: bf16 autocast would run ~5x "
                 "slower than fp32 (benchmarks/results/cpu-precision-matmul.md). Pass --precision fp32; the table "
                 "marks each run's precision.")
    folder = RESULTS / args.suite
    results = {n: load_results(folder / f"{n}.json") for n in METHODS[args.suite] if (folder / f"{n}.json").is_file()}
    for name in (args.only.split(",") if args.only else METHODS[args.suite]):
        if args.summarize_only or name in results:
            continue
        start = time.perf_counter()
        results[name] = run(args.suite, name, METHODS[args.suite][name][0], budget, Path(args.out))
        atomic_write_json(folder / f"{name}.json", results[name])
        print(f"{name}: {results[name]['metrics']} in {time.perf_counter() - start:.0f}s", flush=True)
    ordered = {n: results[n] for n in METHODS[args.suite] if n in results}
    md = "\n".join([
        f"# `{args.suite}` re-measured on SmolLM2-135M-Instruct", "",
        f"{m['device']}, {m['torch_threads']} threads, {m['date']}; one seed (0). Every method: its shipped config "
        f"(`configs/<run>.yaml`) on `stream: {args.suite}` (default order) with {budget['steps']} steps of batch 8 "
        f"per task in bf16 mixed precision (fp32 where the table says so: on CPUs without native bf16), "
        f"{budget['max_train']} train and {budget['max_test']} "
        f"test items per task (seeded, "
        f"label-stratified), probes {PROBES} at {budget['probe_max']} items each. At {budget['max_test']} items a "
        f"task score's standard error is up to {50 / budget['max_test'] ** 0.5:.0f} points.", "",
        *table(args.suite, ordered), "",
        "Published: " + ("O-LoRA's Table 1 (T5-large, order 1, AA)." if args.suite == "standard-cl" else
                         "TRACE's Table (LLaMA-2-7B-Chat, OP / BWT)."), "",
        *paired(ordered),
        *matrices(ordered),
    ])
    write(args.suite, {"machine": m, "budget": budget, "probes": PROBES,
                       "runs": {n: {k: r.get(k) for k in ("strategy", "metrics", "probe", "R", "base", "R_stderr",
                                                          "wall_s")} for n, r in ordered.items()}}, md)


if __name__ == "__main__":
    main()
