"""ES iteration cost on the embedded model, side by side in one process.

Targets: peak memory during an ES iteration <= 1.2x the model's inference peak (the same
greedy generation, unperturbed); an iteration <= 1.15x the time of N generations over the
same reward batch. Peak resident memory is reset between the two measurements through
/proc/self/clear_refs (Linux), so each peak is that phase's own.

    .venv/bin/python benchmarks/es.py [--population 8] [--batches 8 32] [--rounds 3]

On a GPU, peaks are CUDA allocator peaks; ``--model DIR --dtype bfloat16 --name es-gpu-...``
measures another model (a local folder) in bf16 weights and writes its own results file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import machine, write
from retain.evaluation.scoring import left_pad
from retain.strategies.es.noise import (CHUNK, SEGMENT, SEGMENT_ELSEWHERE, TABLE_SIZE, apply_update, perturbed_members,
                              unique_parameters, zscore)
from retain.models import load_model
from retain.streams import builtin_stream


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32],
                    help="reward batch sizes (prompts per member); the study uses 8")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="any model spec `retain run` accepts")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weight dtype (bf16 weights restore through more fixed entries)")
    ap.add_argument("--name", default="es", help="results file stem under benchmarks/results/")
    ap.add_argument("--segments", type=int, nargs="*", default=[],
                    help="also time the member passes (no generation) at these segment sizes, in 1M-entry "
                         "chunks per sync, e.g. 1 4 16: on a GPU, to choose the default")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    # Weights loaded from safetensors may be file-backed pages that inference only reads;
    # make them private memory first, as any training does, so both peaks count them alike.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    task = builtin_stream("arithmetic").tasks[0]
    params = unique_parameters([(n, p) for n, p in model.named_parameters()])
    n_weights = sum(p.numel() for _, p in params)
    reset_peak()
    base_mb = peak_mb()

    def passes_s(members: list[tuple[int, int]], segment: int | None = None) -> float:
        """Seconds of the member passes alone (ES's own work, no generation between them)."""
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in perturbed_members(params, members, 1e-3, segment=segment):
            pass
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    rows = []
    for batch in args.batches:
        prompts = [task.prompt(tok, ex) for ex in task.train[:batch]]
        ids, mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)

        @torch.no_grad()
        def gen() -> list[str]:
            # Exactly max_new_tokens per answer: an early end of sequence would make a member's
            # generation cheaper or dearer than the plain one and hide the ES overhead in the noise.
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=tok.pad_token_id,
                                 min_new_tokens=args.max_new_tokens, max_new_tokens=args.max_new_tokens)
            return tok.batch_decode(out[:, ids.shape[1]:])

        gen()  # warm-up
        for r in range(args.rounds):
            reset_peak()
            start = time.perf_counter()
            for _ in range(args.population):
                gen()
            plain_s = time.perf_counter() - start
            infer_peak = peak_mb()

            reset_peak()
            start = time.perf_counter()
            members = [(1000 * r + m, 1) for m in range(args.population)]
            rewards, fixes = [], 0
            for pert in perturbed_members(params, members, 1e-3):
                fixes = max(fixes, pert.fixed_entries)
                answers = gen()
                rewards.append(float(sum(len(a) for a in answers)))  # any reward: the cost is the same
            apply_update(params, members, zscore(rewards), 5e-4)
            es_s = time.perf_counter() - start
            es_peak = peak_mb()
            # ES's own work without generation (its cost free of generation's variance): the
            # member passes, then an update with zero weights (same passes, weights unchanged).
            sweeps_s = passes_s(members)
            start = time.perf_counter()
            apply_update(params, members, [1e-30] * len(members), 0.0)
            update_s = time.perf_counter() - start
            rows.append({"batch": batch, "round": r, "generate_n_s": round(plain_s, 2), "es_iteration_s": round(es_s, 2),
                         "time_ratio": round(es_s / plain_s, 3), "inference_peak_mb": round(infer_peak, 1),
                         "es_peak_mb": round(es_peak, 1), "memory_ratio": round(es_peak / infer_peak, 3),
                         "overhead_per_member_s": round((es_s - plain_s) / args.population, 3),
                         "passes_per_member_s": round(sweeps_s / args.population, 3), "update_s": round(update_s, 3),
                         "restore_fixes": fixes, "restore_fixes_fraction": round(fixes / n_weights, 6)})
            print(rows[-1], flush=True)

    members = [(7000 + m, 1) for m in range(args.population)]
    by_segment = [{"chunks": k, "passes_per_member_s": round(min(
        passes_s(members, k * CHUNK) for _ in range(2)) / args.population, 4)} for k in args.segments]
    verdicts = []
    for batch in args.batches:
        mine = [x for x in rows if x["batch"] == batch]
        # The median round: generation time alone moves by 10% between rounds on a shared machine.
        median = sorted(x["time_ratio"] for x in mine)[len(mine) // 2]
        worst_mem = max(x["memory_ratio"] for x in mine)
        verdicts += [f"- batch {batch}: time median ratio {median} (target <= 1.15): "
                     f"{'met' if median <= 1.15 else 'NOT met'}; memory worst ratio {worst_mem} (target <= 1.2): "
                     f"{'met' if worst_mem <= 1.2 else 'NOT met'}"]
    lines = [
        "# ES iteration cost", "",
        f"`{args.model}` ({n_weights / 1e6:.1f}M weights, {args.dtype}), population {args.population}, "
        f"reward batches of {', '.join(map(str, args.batches))} prompts of the `arithmetic` task, exactly "
        f"{args.max_new_tokens} new tokens per answer (greedy); "
        f"{machine()['device']}, {machine()['torch_threads']} threads, {machine()['date']}. "
        f"{'CUDA memory allocated' if device == 'cuda' else 'Resident memory'} after loading: {base_mb:.0f} MB. Noise: windows of a shared {TABLE_SIZE / 2**20:.0f}M-entry "
        f"table; members visited in one pass each (restore and next perturbation per segment of at most "
        f"{SEGMENT.get(device, SEGMENT_ELSEWHERE) // CHUNK} chunk(s) of {CHUNK // 2**20}M entries; a GPU syncs once "
        "per segment). "
        "Member passes: the same passes with no generation between them; update: its pass with zero weights.", "",
        "| batch | round | N generations s | ES iteration s | time ratio | overhead per member s | member passes s "
        "per member | update s | inference peak MB | ES peak MB | memory ratio | restore fixes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {x['batch']} | {x['round']} | {x['generate_n_s']} | {x['es_iteration_s']} | {x['time_ratio']} | "
          f"{x['overhead_per_member_s']} | {x['passes_per_member_s']} | {x['update_s']} | "
          f"{x['inference_peak_mb']} | {x['es_peak_mb']} | {x['memory_ratio']} | "
          f"{x['restore_fixes']} ({100 * x['restore_fixes_fraction']:.3f}%) |" for x in rows], "",
        *verdicts, "",
        *(["Member passes alone by segment size (best of two):", "",
           "| chunks per segment | member passes s per member |", "|---|---|",
           *[f"| {x['chunks']} | {x['passes_per_member_s']} |" for x in by_segment], ""] if by_segment else []),
    ]
    write(args.name, {"machine": machine(), "model": args.model, "dtype": args.dtype, "population": args.population, "batches": args.batches,
                 "max_new_tokens": args.max_new_tokens, "weights": n_weights, "rounds": rows,
                 "passes_by_segment": by_segment}, "\n".join(lines))


if __name__ == "__main__":
    main()
