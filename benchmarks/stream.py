"""The built-in stream on the embedded model, one run per strategy, side by side.

Runs configs/{naive,lora,lora-per-task,lora-replay,joint}.yaml in one process (same
machine state), copies each results.json to benchmarks/results/stream/, and writes
benchmarks/results/stream.{md,json} with AA, BWT, FWT, FM, probe retention and wall time,
checked against the targets: naive BWT <= -10; lora-per-task BWT == 0; lora+replay
BWT >= -3 with AA within 5 points of joint. Also times the embedded model's first
(de-quantizing) and cached loads.

    .venv/bin/python benchmarks/stream.py [--only naive,lora] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, write
from retain.io import atomic_write_json
from retain.reporting import load_results
from retain.reporting.compare import compare_plot, comparison_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["naive", "lora", "lora-per-task", "lora-replay", "joint"]


def load_times() -> dict:
    """Seconds to load the embedded model with an empty cache, then from the cache."""
    code = "import time,sys; t=time.perf_counter(); from retain.models import load_model; load_model('smollm2-135m-instruct'); print(time.perf_counter()-t)"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "RETAIN_CACHE_DIR": cache}
        runs = [float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout.split()[-1]) for _ in range(2)]
    return {"first_load_s": round(runs[0], 2), "cached_load_s": round(runs[1], 2)}


def checks(by_name: dict) -> list[str]:
    out = []
    m = lambda n, k: by_name[n]["metrics"][k] if n in by_name else None  # noqa: E731
    if m("naive", "BWT") is not None:
        out.append(f"naive BWT {m('naive', 'BWT'):+.1f} <= -10: {'met' if m('naive', 'BWT') <= -10 else 'NOT met'}")
    if m("lora-per-task", "BWT") is not None:
        out.append(f"lora-per-task BWT {m('lora-per-task', 'BWT'):+.1f} == 0: "
                   f"{'met' if m('lora-per-task', 'BWT') == 0 else 'NOT met'}")
    if m("lora-replay", "BWT") is not None:
        out.append(f"lora+replay BWT {m('lora-replay', 'BWT'):+.1f} >= -3: "
                   f"{'met' if m('lora-replay', 'BWT') >= -3 else 'NOT met'}")
        if m("joint", "AA") is not None:
            gap = m("joint", "AA") - m("lora-replay", "AA")
            out.append(f"lora+replay AA {m('lora-replay', 'AA'):.1f} vs joint {m('joint', 'AA'):.1f} "
                       f"(gap {gap:.1f} <= 5): {'met' if gap <= 5 else 'NOT met'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = ap.parse_args()

    loads = load_times()
    print(loads)
    results = {}
    for name in args.only.split(","):
        # One process per run, exactly as a user runs it, so peak memory is the run's own.
        start = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "retain"), "run", str(ROOT / "configs" / f"{name}.yaml"),
                        f"output_dir={args.out}", "--overwrite", "--quiet"], check=True, stdout=subprocess.DEVNULL)
        results[name] = load_results(Path(args.out) / name)
        print(f"{name}: {results[name]['metrics']} in {time.perf_counter() - start:.0f}s", flush=True)
        atomic_write_json(RESULTS / "stream" / f"{name}.json", results[name])
    runs = list(results.values())
    compare_plot(runs, RESULTS / "stream.png")
    lines = checks(results)
    md = "\n".join([
        "# Built-in stream on the embedded model", "",
        f"`numbers` stream (4 tasks, 100 test items each), SmolLM2-135M-Instruct, seed 0; "
        f"{machine()['device']}, {machine()['torch_threads']} threads, {machine()['date']}. "
        "Configs: `configs/<run>.yaml`; per-run results in `stream/`.", "",
        comparison_table(runs), "",
        "Targets:", "", *[f"- {line}" for line in lines], "",
        f"Embedded model load: {loads['first_load_s']} s the first time (GGUF de-quantized), "
        f"{loads['cached_load_s']} s from the safetensors cache (target < 5 s).", "",
        "![comparison](stream.png)", "",
    ])
    write("stream", {"machine": machine(), "loads": loads, "checks": lines,
                     "runs": {n: {k: r[k] for k in ("metrics", "probe", "wall_s", "R", "base", "peak_memory_mb",
                                                   "train_tokens_per_s")} for n, r in results.items()}}, md)


if __name__ == "__main__":
    main()
