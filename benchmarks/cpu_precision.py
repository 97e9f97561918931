"""fp32 against bf16 mixed precision (``train.precision: bf16``) on the CPU, side by side.

On CPUs with bf16 instructions (AVX512-BF16, AMX) PyTorch's CPU autocast runs matmuls in
bf16, which is what makes the named benchmarks affordable on 2 cores. This measures what
it buys and what it changes: each round runs ``configs/naive.yaml`` on ``standard-cl``
(real O-LoRA inputs of 150-300 tokens) once in fp32 and once in bf16, alternating, one
process each, as ``retain run`` runs them, and reads from each run's results:

- training seconds per step and evaluation seconds per evaluation (from ``timings``);
- the base evaluation's answers (before any training: same weights, only the arithmetic
  differs), item by item: how many of them bf16 changes, and each task's score both ways;
- the final AA and the last phase's training loss.

    .venv/bin/python benchmarks/cpu_precision.py [--rounds 2] [--steps 4] [--items 20]

``--matmul`` measures only one of SmolLM2-135M's MLP projections (8 x 256 tokens, 576 -> 1536)
in fp32 and under bf16 autocast, alternating, on this CPU, and adds a row for its CPU to
``results/cpu-precision-matmul.{md,json}`` (milliseconds; rows of other CPUs are kept): whether
``train.precision: bf16`` pays on the machine at hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, write

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")
PROBES = "[arc-easy,piqa,hellaswag]"


def measure(precision: str, args: argparse.Namespace, out: Path) -> dict:
    retain = str(Path(sys.executable).parent / "retain")
    name = f"precision-{precision}"
    cmd = [retain, "run", str(ROOT / "configs" / "naive.yaml"), f"name={name}", f"output_dir={out}",
           "stream.name=standard-cl", f"stream.max_train={8 * args.steps}", f"stream.max_test={args.items}",
           f"train.max_steps={args.steps}", "train.warmup_steps=1", f"eval.probe={PROBES}",
           f"eval.probe_max={args.items}", "--overwrite", "--quiet"]
    if precision == "bf16":
        cmd.append("train.precision=bf16")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    r = json.loads((out / name / "results.json").read_text())
    timings = r["timings"]
    base = r["evaluations"][0]
    return {
        "s_per_step": sum(t["train_s"] for t in timings) / sum(t["steps"] for t in timings),
        "s_per_eval": statistics.mean(t["eval_s"] for t in timings),
        "base_scores": {task: s["value"] for task, s in base["scores"].items()},
        "base_answers": {task: rec["answers"] for task, rec in base["items"].items()},
        "AA": r["metrics"]["AA"],
        "loss_last": timings[-1]["loss_last"],
    }


def agreement(a: dict, b: dict) -> tuple[int, int]:
    """Items whose base answer is the same under both precisions, of all items."""
    same = total = 0
    for task, answers in a.items():
        for x, y in zip(answers, b[task]):
            same += x == y
            total += 1
    return same, total


def matmul_seconds(autocast: bool, repeats: int = 20) -> float:
    import torch

    layer, x = torch.nn.Linear(576, 1536), torch.randn(8 * 256, 576)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for _ in range(3):
            layer(x)
        start = time.perf_counter()
        for _ in range(repeats):
            layer(x)
    return (time.perf_counter() - start) / repeats


def matmul(rounds: int) -> None:
    times = {p: [] for p in PRECISIONS}
    for _ in range(rounds):
        for p in PRECISIONS:
            times[p].append(matmul_seconds(p == "bf16"))
    m = machine()
    path = RESULTS / "cpu-precision-matmul.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else {}
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    rows[f"{m['cpu']} ({m['cpu_capability']})"] = {
        "machine": m, "fp32_ms": round(1e3 * fp32, 2), "bf16_ms": round(1e3 * bf16, 2),
        "bf16_speedup": round(fp32 / bf16, 3), "rounds": rounds}
    md = ["# One matmul in fp32 and under bf16 autocast, per CPU", "",
          "SmolLM2-135M's MLP up-projection on 8 x 256 tokens (576 -> 1536), forward only, 20 repeats after "
          "3 warm-ups, medians of alternating rounds; one row per CPU this was run on "
          "(`benchmarks/cpu_precision.py --matmul`).", "",
          "| CPU | capability | native bf16 | threads | fp32 ms | bf16 ms | bf16 speed-up | date |",
          "|---|---|---|---|---|---|---|---|",
          *[f"| {cpu} | {r['machine']['cpu_capability']} | {'yes' if r['machine']['cpu_native_bf16'] else 'no'} | "
            f"{r['machine']['torch_threads']} | {r['fp32_ms']:.1f} | {r['bf16_ms']:.1f} | {r['bf16_speedup']:.2f}x | "
            f"{r['machine']['date'][:10]} |" for cpu, r in rows.items()], ""]
    write("cpu-precision-matmul", {"rows": rows}, "\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="steps of batch 8 per task (4 tasks)")
    ap.add_argument("--items", type=int, default=20, help="test items per task and per probe")
    ap.add_argument("--matmul", action="store_true", help="only the matmul comparison (seconds), one row per CPU")
    args = ap.parse_args()
    if args.matmul:
        matmul(max(args.rounds, 3))
        return
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            row = {p: measure(p, args, Path(tmp)) for p in PRECISIONS}
            rounds.append(row)
            print(f"round {i}: " + ", ".join(f"{p} {row[p]['s_per_step']:.2f} s/step {row[p]['s_per_eval']:.1f} s/eval"
                                             for p in PRECISIONS), flush=True)
    med = {p: {k: statistics.median(r[p][k] for r in rounds) for k in ("s_per_step", "s_per_eval")}
           for p in PRECISIONS}
    step_x = med["fp32"]["s_per_step"] / med["bf16"]["s_per_step"]
    eval_x = med["fp32"]["s_per_eval"] / med["bf16"]["s_per_eval"]
    first = rounds[0]
    same, total = agreement(first["fp32"]["base_answers"], first["bf16"]["base_answers"])
    m = machine()
    tasks = list(first["fp32"]["base_scores"])
    md = "\n".join([
        "# fp32 against bf16 mixed precision on the CPU", "",
        f"{m['device']}, {m['torch_threads']} threads, {m['date']}; `configs/naive.yaml` (full fine-tuning) on "
        f"`standard-cl` order 1, {args.steps} steps of batch 8 per task, {args.items} test items per task and per "
        f"probe ({PROBES}), {args.rounds} alternating rounds, one process per run.", "",
        "| round | fp32 s/step | bf16 s/step | fp32 s/eval | bf16 s/eval |", "|---|---|---|---|---|",
        *[f"| {i} | {r['fp32']['s_per_step']:.2f} | {r['bf16']['s_per_step']:.2f} | {r['fp32']['s_per_eval']:.1f} | "
          f"{r['bf16']['s_per_eval']:.1f} |" for i, r in enumerate(rounds)],
        f"| median | {med['fp32']['s_per_step']:.2f} | {med['bf16']['s_per_step']:.2f} | "
        f"{med['fp32']['s_per_eval']:.1f} | {med['bf16']['s_per_eval']:.1f} |", "",
        f"bf16 is **{step_x:.2f}x** as fast per training step and **{eval_x:.2f}x** per evaluation.", "",
        f"Base evaluation (before training, same weights): {same} of {total} answers the same under both "
        f"({100 * same / total:.1f}%).", "",
        "| task | fp32 base | bf16 base |", "|---|---|---|",
        *[f"| {t} | {first['fp32']['base_scores'][t]:.1f} | {first['bf16']['base_scores'][t]:.1f} |" for t in tasks],
        "",
        f"After training (round 0): AA {first['fp32']['AA']:.1f} (fp32) and {first['bf16']['AA']:.1f} (bf16); last "
        f"training loss {first['fp32']['loss_last']:.3f} and {first['bf16']['loss_last']:.3f}.", ""])
    write("cpu-precision", {"machine": m, "args": vars(args), "rounds": rounds, "median": med,
                            "step_speedup": round(step_x, 3), "eval_speedup": round(eval_x, 3),
                            "base_agreement": [same, total]}, md)


if __name__ == "__main__":
    main()
