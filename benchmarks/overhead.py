"""Engine overhead: retain's training loop against a plain PyTorch + PEFT loop.

Same model (the embedded SmolLM2-135M-Instruct with LoRA r=16 on q/v), same examples in
the same order, same batch size; the two loops alternate in rounds in one process so both
see the same machine state. Target: retain's tokens/s at least 0.95x the plain loop's.

    .venv/bin/python benchmarks/overhead.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from common import machine, write
from retain.config import validate_config
from retain.loop import Run, prepare
from retain.models import load_model
from retain.ui import UI


def plain_loop(model, tokenizer, items, steps: int, batch_size: int, lr: float,
               max_length: int | None = None) -> tuple[int, float]:
    """The loop a user would write by hand: tokenize, pad, mask the prompt, AdamW; a sequence
    over ``max_length`` loses the start of its prompt."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    tokens, start = 0, time.perf_counter()
    for step in range(steps):
        batch = items[step * batch_size : (step + 1) * batch_size]
        seqs = []
        for it in batch:
            p = tokenizer(it.prompt)["input_ids"]
            t = tokenizer(it.target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            if max_length is not None and len(p) + len(t) > max_length:
                p = p[len(p) + len(t) - max_length:]
            seqs.append((p + t, len(p)))
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (s, n_prompt) in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
            labels[r, n_prompt : len(s)] = torch.tensor(s[n_prompt:])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
    return tokens, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    config = validate_config({
        "name": "overhead", "model": args.model, "stream": "numbers", "strategy": "lora",
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": 1e-4},
        "eval": {"probe": False},
    })
    ctx, stack = prepare(config, UI(quiet=True))
    run = Run(config, None, UI(quiet=True))
    task = ctx.stream.tasks[0]

    base, tok = load_model(args.model)
    plain = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                            target_modules=["q_proj", "v_proj"]))
    items = task.items(tok)
    rounds = []
    for r in range(args.rounds):
        # retain: the real training phase (strategy hooks, collate, Accelerate backward).
        timing = run.train_phase(ctx, stack, [task], r)
        retain_tps = timing["tokens"] / timing["train_s"]
        # plain loop on the same examples in the order retain drew them for this phase.
        order = items[:]
        random.Random(config.seed * 1000 + r).shuffle(order)
        tokens, seconds = plain_loop(plain, tok, order * 2, args.steps, args.batch_size, 1e-4)
        plain_tps = tokens / seconds
        rounds.append({"round": r, "retain_tokens_per_s": round(retain_tps, 1), "plain_tokens_per_s": round(plain_tps, 1),
                       "ratio": round(retain_tps / plain_tps, 4)})
        print(rounds[-1])
    # Medians: a round disturbed by other work on the machine moves a mean, not a median.
    retain_total = statistics.median(x["retain_tokens_per_s"] for x in rounds)
    plain_total = statistics.median(x["plain_tokens_per_s"] for x in rounds)
    ratio = statistics.median(x["ratio"] for x in rounds)
    data = {"machine": machine(), "model": args.model, "steps": args.steps, "batch_size": args.batch_size,
            "rounds": rounds, "retain_tokens_per_s": round(retain_total, 1), "plain_tokens_per_s": round(plain_total, 1),
            "ratio": round(ratio, 4), "target": 0.95, "meets_target": ratio >= 0.95}
    md = "\n".join([
        "# Engine overhead", "",
        f"{args.model}, LoRA r=16 on q/v, batch {args.batch_size}, {args.steps} steps per round, "
        f"{args.rounds} alternating rounds; {data['machine']['device']}, {data['machine']['torch_threads']} threads, "
        f"{data['machine']['date']}.", "",
        "| round | retain tokens/s | plain PyTorch+PEFT tokens/s | ratio |", "|---|---|---|---|",
        *[f"| {x['round']} | {x['retain_tokens_per_s']} | {x['plain_tokens_per_s']} | {x['ratio']} |" for x in rounds],
        f"| median | {data['retain_tokens_per_s']} | {data['plain_tokens_per_s']} | **{data['ratio']}** |", "",
        f"Target: ratio >= 0.95 -> {'met' if data['meets_target'] else 'NOT met'}.", "",
    ])
    write("overhead", data, md)


if __name__ == "__main__":
    main()
