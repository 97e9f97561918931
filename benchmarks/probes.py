"""Which general-ability suites does a model score clearly above chance?

The base model is scored on every named probe (``retain list`` shows them) with the same
seeded sample of items a run with ``eval.probe_max`` would score. A probe is "above chance"
when the lower end of its score's 95% interval (score - 1.96 standard errors) lies above the
chance level; a probe at chance cannot show forgetting, only noise. Resumable: each probe's
figures are written as soon as it is scored, and a rerun skips the probes already done.

    python benchmarks/probes.py                      # the embedded SmolLM2-135M, 200 items each
    python benchmarks/probes.py --model PATH --items 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write  # noqa: E402


def main() -> None:
    from retain.evaluation.scoring import evaluate_task
    from retain.models import load_model
    from retain.streams import seeded_sample
    from retain.streams.benchmarks import DEFAULT_PROBES, PROBES, probe_suite

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--name", default="probes")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    partial = RESULTS / f"{args.name}.partial.json"
    done = json.loads(partial.read_text()) if partial.exists() else {}
    model, tokenizer = load_model(args.model)
    for name in PROBES:
        if name in done:
            continue
        task = probe_suite(name)
        task.test, _ = seeded_sample(task.test, args.items, f"{name}/test", 0)
        start = time.perf_counter()
        score = evaluate_task(model, tokenizer, task, batch_size=args.batch_size)
        done[name] = {"value": score.value, "stderr": score.stderr, "n": score.n, "scores": score.scores,
                      "chance": task.chance, "scoring": ("acc_norm" if task.choice_norm else "acc")
                      if task.metric == "choice" else task.metric, "seconds": round(time.perf_counter() - start, 1)}
        partial.write_text(json.dumps(done, indent=1))
        print(name, done[name], flush=True)
    rows = []
    for name, d in done.items():
        low = d["value"] - 1.96 * (d["stderr"] or 0.0)
        above = "yes" if low > d["chance"] else "no"
        extra = ", ".join(f"{k} {v:.1f}" for k, v in d["scores"].items() if k != d["scoring"])
        rows.append(f"| {name} | {d['scoring']} | {d['n']} | {d['chance']:.1f} | {d['value']:.1f} ± "
                    f"{1.96 * (d['stderr'] or 0):.1f} | {above} | {extra} | {d['seconds']:.0f} |"
                    + (" default |" if name in DEFAULT_PROBES else " |"))
    m = machine()
    md = "\n".join([
        f"# General-ability probes on {args.model}", "",
        f"Base model, {args.items} seeded items per probe (eval.sample_seed 0), eval batch {args.batch_size}; "
        f"{m['date']}, {m['cpu_count']} CPU cores ({m['device']}). ± is the 95% interval (1.96 standard errors); "
        "'above chance': its lower end is above the chance level.", "",
        "| probe | scoring | items | chance | score | above chance | other scoring | seconds | |",
        "|---|---|---|---|---|---|---|---|---|", *rows, ""])
    write(args.name, {"machine": m, "model": args.model, "items": args.items, "probes": done}, md)
    partial.unlink()


if __name__ == "__main__":
    main()
