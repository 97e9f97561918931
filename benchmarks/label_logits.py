"""The training step with logits only at the answer columns, against logits at every position.

`standard-cl` prompts run to a few hundred tokens and their targets are a class name of a few
tokens, yet a causal LM's forward pass projects every position onto SmolLM2's 49,152-token
vocabulary and transformers' loss upcasts all of it to fp32. ``retain.lm_loss.lm_outputs``
projects only the columns that predict a target. This times one forward + backward on the same
batches both ways, alternating, for LoRA (r 16 on q/v, as the shipped configs) and full
fine-tuning, in fp32 and under bf16 autocast (bf16 only where the CPU has native bf16), and
checks that both ways give the same loss (largest difference reported).

    .venv/bin/python benchmarks/label_logits.py [--batches 6] [--rounds 2] [--batch-size 8]

Writes results/label-logits.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from common import machine, write
from retain.batching import collate
from retain.config import validate_config
from retain.lm_loss import lm_outputs, target_columns
from retain.models import load_model
from retain.streams import build_stream

MAX_LENGTH = 512


def batches(tok, per_task: int, size: int) -> list[dict]:
    cfg = validate_config({"name": "x", "model": "smollm2-135m-instruct", "strategy": "naive",
                           "stream": {"name": "standard-cl", "order": 1, "max_train": per_task, "max_test": 1}})
    stream = build_stream(cfg)
    items = [item for task in stream.tasks for item in task.items(tok)]
    # one batch from each task in turn, so every task's prompt lengths are in the sample
    items = [items[t * per_task + i] for i in range(per_task) for t in range(len(stream.tasks))]
    return [collate(tok, items[i:i + size], MAX_LENGTH) for i in range(0, len(items) - size + 1, size)]


def step(model, batch: dict, lean: bool, precision: str) -> tuple[float, float]:
    """Seconds of one forward + backward, and the loss."""
    autocast = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    start = time.perf_counter()
    with autocast:
        loss = lm_outputs(model, batch, full_logits=not lean).loss
    loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds, float(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=6, help="batches timed per setting and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    m = machine()
    precisions = ["fp32", "bf16"] if m["cpu_native_bf16"] else ["fp32"]
    base, tok = load_model("smollm2-135m-instruct")
    sample = batches(tok, per_task=(args.batches * args.batch_size + 3) // 4, size=args.batch_size)[:args.batches]
    real = [int(b["attention_mask"].sum()) for b in sample]
    kept = [len(target_columns(b["labels"])) for b in sample]
    widths = [b["input_ids"].shape[1] for b in sample]
    rows = []
    for mode in ("full", "lora"):
        if mode == "full":
            model = base
            for p in model.parameters():
                p.requires_grad_(True)
        else:  # wraps the same base, frozen: LoRA's weights alone train
            model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"]))
        model.train()
        for precision in precisions:
            times = {"all": [], "targets": []}
            diff = 0.0
            step(model, sample[0], True, precision)  # warm-up
            for _ in range(args.rounds):
                for batch in sample:
                    t_all, l_all = step(model, batch, False, precision)
                    t_kept, l_kept = step(model, batch, True, precision)
                    times["all"].append(t_all)
                    times["targets"].append(t_kept)
                    diff = max(diff, abs(l_all - l_kept))
            row = {"mode": mode, "precision": precision, "all_s": round(statistics.median(times["all"]), 3),
                   "targets_s": round(statistics.median(times["targets"]), 3), "max_loss_diff": diff}
            row["speedup"] = round(row["all_s"] / row["targets_s"], 2)
            rows.append(row)
            print(row, flush=True)
    data = {"machine": m, "batch_size": args.batch_size, "batches": args.batches, "rounds": args.rounds,
            "padded_width_median": statistics.median(widths), "real_tokens_per_batch_median": statistics.median(real),
            "kept_columns_median": statistics.median(kept), "rows": rows}
    md = "\n".join([
        "# Training step: logits at the answer columns against every position", "",
        f"SmolLM2-135M-Instruct, one forward + backward on `standard-cl` batches of {args.batch_size} (order 1, "
        f"tasks in turn; padded width median {data['padded_width_median']} tokens, "
        f"{data['kept_columns_median']} columns kept), {args.batches} batches x {args.rounds} rounds per "
        f"setting, both ways alternating; medians. {m['cpu']} ({m['cpu_capability']}), {m['torch_threads']} "
        f"threads, {m['date']} (`benchmarks/label_logits.py`).", "",
        "| model | precision | every position s | answer columns s | speed-up | largest loss difference |",
        "|---|---|---|---|---|---|",
        *[f"| {'LoRA r16 q/v' if r['mode'] == 'lora' else 'full fine-tuning'} | {r['precision']} | {r['all_s']} | "
          f"{r['targets_s']} | {r['speedup']}x | {r['max_loss_diff']:.1e} |" for r in rows],
        "",
    ])
    write("label-logits", data, md)


if __name__ == "__main__":
    main()
