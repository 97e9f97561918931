"""Training throughput on examples of varied length: length-grouped batches against a plain loop.

The four `standard-cl` tasks (DBpedia, Amazon, Yahoo, AG News: prompts from a dozen to a few
hundred tokens) trained as one phase of exactly one epoch, so every loop sees the same
examples and the same real tokens (asserted). Per round, side by side in one process:

- retain's loop with ``train.group_by_length: true``;
- retain's loop with random batches (its overhead against the plain loop);
- a plain PyTorch + PEFT loop in a random order, as a user writes it (benchmarks/overhead.py).

Tokens/s counts real (unpadded) tokens. Target: grouped >= 1.3x the plain loop.

    .venv/bin/python benchmarks/throughput.py [--per-task 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
from itertools import islice

from peft import LoraConfig, get_peft_model

from common import machine, write
from overhead import plain_loop
from retain.batching import batch_stream, token_lengths
from retain.config import validate_config
from retain.loop import Run, prepare
from retain.models import load_model
from retain.state import phase_seed
from retain.ui import UI


#: Tokens per training example in all three loops (the prompt loses its start beyond it).
MAX_LENGTH = 512


def padding(batches: list[list[int]], lengths: list[int]) -> float:
    """Padded positions per real token."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return padded / real - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--per-task", type=int, default=40, help="training examples per task")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    tasks_n, bs = 4, args.batch_size
    steps = tasks_n * args.per_task // bs
    if (tasks_n * args.per_task) % bs or steps % tasks_n:
        raise SystemExit(f"--per-task {args.per_task}: 4 x per-task must be a multiple of 4 x batch size")

    def config(grouped: bool):
        return validate_config({
            "name": "throughput", "model": args.model, "strategy": "lora",
            "stream": {"name": "standard-cl", "order": 1, "max_train": args.per_task, "max_test": 1},
            "train": {"max_steps": steps // tasks_n, "batch_size": bs, "lr": 1e-4, "max_length": MAX_LENGTH,
                      "group_by_length": grouped, "checkpoint_every": 0},
            "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}, "eval": {"probe": False},
        })

    loops = {}
    for grouped in (True, False):
        cfg = config(grouped)
        ctx, stack = prepare(cfg, UI(quiet=True))
        loops[grouped] = (cfg, ctx, stack, Run(cfg, None, UI(quiet=True)))
    cfg, ctx, _, _ = loops[True]
    tasks = ctx.stream.tasks
    items = [item for task in tasks for item in task.items(ctx.tokenizer)]
    lengths = token_lengths(ctx.tokenizer, items, MAX_LENGTH)
    base, tok = load_model(args.model)
    plain = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                            target_modules=["q_proj", "v_proj"]))
    rounds = []
    for r in range(args.rounds):
        row = {"round": r}
        for grouped, name in ((True, "grouped"), (False, "random")):
            _, c, stack, run = loops[grouped]
            timing = run.train_phase(c, stack, tasks, r)
            row[f"{name}_tokens"], row[f"{name}_tokens_per_s"] = timing["tokens"], timing["tokens"] / timing["train_s"]
            drawn = batch_stream(list(range(len(items))), bs, random.Random(phase_seed(cfg.seed, r)),
                                 lengths if grouped else None)
            row[f"{name}_padding"] = padding(list(islice(drawn, steps)), lengths)
        order = list(range(len(items)))
        random.Random(1000 + r).shuffle(order)
        tokens, seconds = plain_loop(plain, tok, [items[i] for i in order], steps, bs, 1e-4, MAX_LENGTH)
        row["plain_tokens"], row["plain_tokens_per_s"] = tokens, tokens / seconds
        row["plain_padding"] = padding([order[b * bs:(b + 1) * bs] for b in range(steps)], lengths)
        # One epoch each: the same examples, so the same real tokens.
        assert row["grouped_tokens"] == row["random_tokens"] == row["plain_tokens"], row
        row = {k: round(v, 1 if k.endswith("per_s") else 3) if isinstance(v, float) else v for k, v in row.items()}
        rounds.append(row)
        print(row, flush=True)

    med = lambda key: statistics.median(x[key] for x in rounds)  # noqa: E731
    ratio = statistics.median(x["grouped_tokens_per_s"] / x["plain_tokens_per_s"] for x in rounds)
    overhead = statistics.median(x["random_tokens_per_s"] / x["plain_tokens_per_s"] for x in rounds)
    data = {"machine": machine(), "model": args.model, "per_task": args.per_task, "batch_size": bs, "steps": steps,
            "examples": len(items), "real_tokens": rounds[0]["plain_tokens"],
            "length_min_median_max": [min(lengths), int(statistics.median(lengths)), max(lengths)],
            "rounds": rounds, "grouped_vs_plain": round(ratio, 3), "random_vs_plain": round(overhead, 3),
            "target": 1.3, "meets_target": ratio >= 1.3}
    m = data["machine"]
    md = "\n".join([
        "# Training throughput: length-grouped batches", "",
        f"{args.model}, LoRA r=16 on q/v, batch {bs}; `standard-cl` order 1, {args.per_task} training examples per "
        f"task ({len(items)} in all, {data['real_tokens']} real tokens; lengths min / median / max "
        f"{' / '.join(map(str, data['length_min_median_max']))} tokens), one epoch of {steps} steps per loop and "
        f"round; {args.rounds} rounds; {m['device']}, {m['torch_threads']} threads, {m['date']}.", "",
        "| round | retain grouped tokens/s | retain random tokens/s | plain PyTorch+PEFT tokens/s | "
        "padding per real token: grouped / random / plain |", "|---|---|---|---|---|",
        *[f"| {x['round']} | {x['grouped_tokens_per_s']} | {x['random_tokens_per_s']} | {x['plain_tokens_per_s']} | "
          f"{x['grouped_padding']} / {x['random_padding']} / {x['plain_padding']} |" for x in rounds],
        f"| median | {med('grouped_tokens_per_s')} | {med('random_tokens_per_s')} | {med('plain_tokens_per_s')} | |",
        "",
        f"retain grouped / plain loop: **{data['grouped_vs_plain']}x** (median of per-round ratios; target >= 1.3: "
        f"{'met' if data['meets_target'] else 'NOT met'}); retain random / plain loop: {data['random_vs_plain']}x.",
        "",
    ])
    write("throughput", data, md)


if __name__ == "__main__":
    main()
