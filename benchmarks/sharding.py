"""Memory per process of a 2-process run: replicated weights against ``train.sharding`` zero2 and zero3.

Each setting is one ``torchrun`` launch of 2 processes (gloo on CPU, one thread each) that sets
up ``smollm2-135m-instruct`` for full fine-tuning (``naive``: every weight trains, so weights,
gradients and AdamW's two moments are all there is to shard) exactly as ``retain run`` does,
then takes optimizer steps through the loop's own step on batches of 8 `standard-cl` training
examples (64 tokens at most, so that activations do not hide the rest), each process training
on its half. Reported per process: the bytes of model state it holds after the steps (its
weights and AdamW moments, counted tensor by tensor, a shard its own part; gradients exist
only inside a step, the loop frees them after it), its resident memory after set-up and
after the steps, its peak (which includes loading the whole model before it is sharded),
and seconds per step. Every process runs with MALLOC_MMAP_THRESHOLD_=1 MiB, so that memory
freed by tensors is returned to the OS and the resident figures follow what is held. The
settings alternate over rounds, all in one invocation.

    .venv/bin/python benchmarks/sharding.py [--rounds 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write

SETTINGS = ("none", "zero2", "zero3")
MAX_LENGTH = 64
#: Blocks of at least 1 MiB are mapped on their own and returned to the OS when freed.
MMAP_THRESHOLD = 2**20


def status_mb(key: str) -> float:
    """A field of /proc/self/status in MiB: VmRSS (resident now), VmHWM (peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def local_mb(tensors) -> float:
    """MiB this process holds of ``tensors`` (a shard: its local part)."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors) / 2**20


def child(mode: str, steps: int, out: Path) -> None:
    """One process of a launch: set up, train ``steps`` steps, write this rank's figures."""
    import random

    import torch

    from retain.batching import batch_stream
    from retain.config import validate_config
    from retain.loop import Run, prepare
    from retain.ui import UI

    cfg = validate_config({"name": "sharding", "model": "smollm2-135m-instruct", "strategy": "naive",
                           "stream": {"name": "standard-cl", "order": 1, "max_train": 64, "max_test": 1},
                           "train": {"batch_size": 8, "lr": 1e-5, "max_length": MAX_LENGTH, "sharding": mode},
                           "eval": {"probe": False}})
    ctx, stack = prepare(cfg, UI(quiet=True))
    after_setup = status_mb("VmRSS")
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    items = [i for t in ctx.stream.tasks for i in t.items(ctx.tokenizer)]
    batches = batch_stream(items, cfg.train.batch_size, random.Random(0))
    run = Run(cfg, Path(tempfile.mkdtemp()), UI(quiet=True))
    ctx.model.train()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss, _tokens = run.gradient_step(ctx, stack, next(batches),
                                          params, optimizer, scheduler)
        times.append(time.perf_counter() - start)
        losses.append(loss)
    moments = [v for state in optimizer.state.values() for v in state.values() if v.dim() > 0]
    figures = {"mode": mode, "rank": ctx.processes.rank,
               "weights_mb": round(local_mb(ctx.model.parameters())),
               "moments_mb": round(local_mb(moments)),
               "setup_mb": round(after_setup), "rss_mb": round(status_mb("VmRSS")),
               "peak_mb": round(status_mb("VmHWM")),
               "s_per_step": round(statistics.median(times[1:] or times), 2), "losses": [round(x, 5) for x in losses]}
    figures["state_mb"] = figures["weights_mb"] + figures["moments_mb"]
    (out / f"{mode}-{ctx.processes.rank}.json").write_text(json.dumps(figures))


def launch(mode: str, steps: int, out: Path) -> list[dict]:
    # glibc keeps freed blocks for reuse, so without this a process's resident memory stays at
    # its high-water mark and the per-layer gather buffers that FSDP frees would still count.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                    "--child", mode, "--steps", str(steps), "--out", str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return [json.loads((out / f"{mode}-{rank}.json").read_text()) for rank in (0, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, Path(args.out))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in SETTINGS:
                for figures in launch(mode, args.steps, Path(tmp)):
                    rows.append({"round": r, **figures})
                    print(rows[-1], flush=True)
    keys = ("weights_mb", "moments_mb", "state_mb", "setup_mb", "rss_mb", "peak_mb", "s_per_step")
    med = {mode: {k: statistics.median(x[k] for x in rows if x["mode"] == mode) for k in keys} for mode in SETTINGS}
    same = all(x["losses"] == rows[0]["losses"] for x in rows)
    m = machine()
    data = {"machine": m, "rows": rows, "median": med, "same_losses": same}
    base = med["none"]
    md = "\n".join([
        "# Sharded training: memory per process", "",
        f"smollm2-135m-instruct, full fine-tuning (`naive`, every weight trains), 2 processes (torchrun, gloo, one "
        f"thread each), batches of 8 `standard-cl` training examples ({MAX_LENGTH} tokens at most) split 4 + 4, "
        f"{args.steps} steps through the loop's step; each setting a launch of its own, {args.rounds} alternating "
        f"rounds; {m['device']}, {m['date']}, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}. Per process, in MiB: model "
        "state held after the steps (weights and "
        "AdamW moments, a shard counting its own part), resident memory after set-up, after the steps and at its "
        "peak (the peak includes loading the whole model before it is sharded).", "",
        "| round | sharding | rank | weights | AdamW moments | state | RSS after set-up | RSS after steps | peak RSS | "
        "s / step |", "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {x['round']} | {x['mode']} | {x['rank']} | {x['weights_mb']} | {x['moments_mb']} | {x['state_mb']} | "
          f"{x['setup_mb']} | {x['rss_mb']} | {x['peak_mb']} | {x['s_per_step']} |" for x in rows], "",
        "Medians over rounds and ranks: " + "; ".join(
            f"{mode}: state {med[mode]['state_mb']:.0f} MiB, RSS after steps {med[mode]['rss_mb']:.0f} MiB, peak "
            f"{med[mode]['peak_mb']:.0f} MiB, {med[mode]['s_per_step']:.2f} s/step" for mode in SETTINGS) + ".",
        "Against replicated: " + "; ".join(
            f"{mode} state {med[mode]['state_mb'] / base['state_mb']:.2f}x, RSS after steps "
            f"{med[mode]['rss_mb'] / base['rss_mb']:.2f}x, time per step "
            f"{med[mode]['s_per_step'] / base['s_per_step']:.2f}x" for mode in ("zero2", "zero3")) + ".",
        f"Losses of every launch {'identical to 5 decimals' if same else 'NOT identical'} across settings, ranks and "
        "rounds.", ""])
    write("sharding", data, md)


if __name__ == "__main__":
    main()
