"""Activation memory: a training step with and without ``train.gradient_checkpointing``.

Each setting runs in a process of its own (peak memory is per process): the model and LoRA
set up as ``retain run`` does, then forward and backward passes on one batch of the 8 longest
`standard-cl` training examples, 512 tokens at most. Reported per setting: resident memory
after setup, the peak, their difference (what the steps added: activations, gradients) and
seconds per step; the settings alternate over rounds, all in one invocation.

    .venv/bin/python benchmarks/memory.py [--rounds 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from common import machine, write

MAX_LENGTH = 512


def child(on: bool, steps: int) -> dict:
    import torch

    from retain.batching import collate, token_lengths
    from retain.config import validate_config
    from retain.loop import prepare
    from retain.ui import UI

    torch.set_num_threads(2)
    cfg = validate_config({"name": "memory", "model": "smollm2-135m-instruct", "strategy": "lora",
                           "stream": {"name": "standard-cl", "order": 1, "max_train": 40, "max_test": 1},
                           "train": {"max_length": MAX_LENGTH, "gradient_checkpointing": on},
                           "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
                           "eval": {"probe": False}})
    ctx, _ = prepare(cfg, UI(quiet=True))
    items = [i for t in ctx.stream.tasks for i in t.items(ctx.tokenizer)]
    lengths = token_lengths(ctx.tokenizer, items, MAX_LENGTH)
    batch = collate(ctx.tokenizer, [items[i] for i in sorted(range(len(items)), key=lambda i: -lengths[i])[:8]],
                    MAX_LENGTH)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731  (MiB; peak so far)
    after_setup = rss()
    ctx.model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        ctx.model(**batch).loss.backward()
        ctx.model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"checkpointing": on, "tokens_per_row": int(batch["input_ids"].shape[1]), "setup_mb": round(after_setup),
            "peak_mb": round(rss()), "added_mb": round(rss() - after_setup),
            "s_per_step": round(statistics.median(times[1:] or times), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "on", args.steps)))
        return
    rows = []
    for r in range(args.rounds):
        for setting in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--child", setting, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            rows.append({"round": r, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    med = {on: {k: statistics.median(x[k] for x in rows if x["checkpointing"] == on)
                for k in ("setup_mb", "peak_mb", "added_mb", "s_per_step")} for on in (False, True)}
    saving = 1 - med[True]["added_mb"] / med[False]["added_mb"]
    slower = med[True]["s_per_step"] / med[False]["s_per_step"]
    m = machine()
    data = {"machine": m, "rows": rows, "median": {str(k): v for k, v in med.items()},
            "added_memory_saving": round(saving, 3), "time_ratio": round(slower, 3)}
    md = "\n".join([
        "# Activation memory: gradient checkpointing", "",
        f"smollm2-135m-instruct, LoRA r=16 on q/v; forward and backward on one batch of the 8 longest `standard-cl` "
        f"training examples ({rows[0]['tokens_per_row']} tokens per row); each setting in its own process, "
        f"{args.rounds} alternating rounds of {args.steps} steps; {m['device']}, {m['date']}. Memory: resident set "
        "(MiB) after setup and at its peak; added: what the steps added.", "",
        "| round | checkpointing | after setup MiB | peak MiB | added MiB | s / step |", "|---|---|---|---|---|---|",
        *[f"| {x['round']} | {'on' if x['checkpointing'] else 'off'} | {x['setup_mb']} | {x['peak_mb']} | "
          f"{x['added_mb']} | {x['s_per_step']} |" for x in rows], "",
        f"Median memory added by the steps: {med[False]['added_mb']:.0f} MiB without, {med[True]['added_mb']:.0f} MiB "
        f"with checkpointing ({100 * saving:.0f}% less); time per step {slower:.2f}x.", ""])
    write("memory", data, md)


if __name__ == "__main__":
    main()
