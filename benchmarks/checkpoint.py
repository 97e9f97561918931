"""What an in-task checkpoint costs: seconds and bytes, against the training step it protects.

On the embedded SmolLM2-135M-Instruct and the built-in numbers stream, for full
fine-tuning (naive) and LoRA (r=16 on q/v): the mean gradient step, the mean in-task
checkpoint (trainable tensors, AdamW moments, scheduler, RNGs; written atomically), its
size on disk, and a restore; then the share of training time a checkpoint every k steps
adds. Measured in one process, one strategy after the other; a few minutes on 2 cores.

    .venv/bin/python benchmarks/checkpoint.py [--steps 8] [--saves 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

from common import machine, write
from retain import checkpoint
from retain.batching import batch_stream
from retain.config import validate_config
from retain.loop import Run, prepare
from retain.state import Progress, RunState
from retain.ui import UI


def measure(strategy: str, model: str, steps: int, saves: int) -> dict:
    import random

    cfg = validate_config({"name": "ckpt", "model": model, "stream": "numbers", "strategy": strategy,
                           "train": {"batch_size": 8, "lr": 1e-4}, "eval": {"probe": False}})
    ctx, stack = prepare(cfg, UI(quiet=True))
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, Path(tmp), UI(quiet=True))
        task = ctx.stream.tasks[0]
        stack.before_task(ctx, [task])
        params = stack.trainable_parameters(ctx)
        ids = {id(p) for p in params}
        keys = [n for n, p in ctx.model.named_parameters() if id(p) in ids]
        import torch
        from transformers import get_scheduler

        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
        scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=0)
        optimizer, scheduler = ctx.accelerator.prepare(optimizer, scheduler)
        batches = batch_stream(task.items(ctx.tokenizer), cfg.train.batch_size, random.Random(0))
        ctx.model.train()
        step_s = []
        for items in islice(batches, steps):
            start = time.perf_counter()
            run.gradient_step(ctx, stack, items, params, optimizer, scheduler)
            step_s.append(time.perf_counter() - start)
        state = RunState()
        save_s, restore_s, size = [], [], 0
        for i in range(saves):
            progress = Progress(phase=0, losses=[0.0] * steps, tokens=0, seconds=0.0)
            start = time.perf_counter()
            checkpoint.save_progress(Path(tmp), state, progress, ctx.accelerator.unwrap_model(ctx.model), keys,
                                     optimizer, scheduler)
            save_s.append(time.perf_counter() - start)
            folder = checkpoint.folder(Path(tmp))
            size = sum(p.stat().st_size for p in folder.iterdir() if p.name != checkpoint.STATE)
            start = time.perf_counter()
            checkpoint.restore_progress(Path(tmp), progress, ctx.accelerator.unwrap_model(ctx.model),
                                        optimizer, scheduler)
            restore_s.append(time.perf_counter() - start)
    step = statistics.mean(step_s[1:]) if len(step_s) > 1 else step_s[0]  # the first step warms up
    save = statistics.mean(save_s)
    return {
        "strategy": strategy, "trainable_parameters": sum(p.numel() for p in params),
        "step_s": round(step, 3), "save_s": round(save, 3), "save_s_all": [round(s, 3) for s in save_s],
        "restore_s": round(statistics.mean(restore_s), 3), "checkpoint_mb": round(size / 2**20, 1),
        "overhead_every_10": round(save / (10 * step), 4), "overhead_every_50": round(save / (50 * step), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=8, help="gradient steps timed per strategy")
    ap.add_argument("--saves", type=int, default=3, help="checkpoints timed per strategy")
    args = ap.parse_args()
    rows = [measure(s, args.model, args.steps, args.saves) for s in ("naive", "lora")]
    data = {"machine": machine(), "model": args.model, "steps": args.steps, "saves": args.saves, "results": rows}
    lines = [
        "# In-task checkpoint cost", "",
        f"{args.model}, numbers stream, batch 8; {args.steps} gradient steps (mean of all but the first) and "
        f"{args.saves} checkpoints per strategy, one process; {data['machine']['date']}, "
        f"{data['machine']['cpu_count']} CPU cores.", "",
        "| strategy | trainable | step s | checkpoint s | checkpoint MB | restore s | added at every 10 | at every 50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['trainable_parameters']:,} | {r['step_s']} | {r['save_s']} "
                     f"({', '.join(map(str, r['save_s_all']))}) | {r['checkpoint_mb']} | {r['restore_s']} | "
                     f"{100 * r['overhead_every_10']:.1f}% | {100 * r['overhead_every_50']:.1f}% |")
    write("checkpoint", data, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
