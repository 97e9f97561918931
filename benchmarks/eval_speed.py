"""Choice scoring at benchmark scale: the landed scorer against the shared-prefix one.

The same items through both, on the same model, in one invocation: the base model's
evaluation of AG News, Amazon, Yahoo and DBpedia (O-LoRA format: the labels as options)
and an MMLU probe, 50 items each (a seeded, label-stratified sample). Each scorer runs in
a fresh process so its peak resident memory is its own; a short LoRA training run of the
same tasks gives the training peak to compare with. Reported: seconds, peak memory,
accuracy (acc and acc_norm), whether every prediction agrees, and the largest
log-likelihood difference.

Resumable: each measurement is written to benchmarks/results/eval-speed.json when it
ends, and a rerun skips those already there (``--fresh`` measures everything again).

    .venv/bin/python benchmarks/eval_speed.py [--data ../shared/data] [--items 50]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

from common import RESULTS, machine, write

TASKS = ["agnews", "amazon", "yahoo", "dbpedia"]
PROMPT = "Classify the text into one of these labels: {labels}.\n{text}\nLabel:"
PROBE = "{input}\nChoices: {choices}\nAnswer:"


def build_tasks(data: Path, items: int):
    from retain.streams import Task, load_file, seeded_sample
    from retain.streams.task import Example

    fields = dict(input_field="input", output_field="output", options_field="options", metric="choice")
    tasks = []
    for name in TASKS:
        test, _ = seeded_sample(load_file(data / f"cl15_{name}" / "test.jsonl", **fields), items, f"{name}/test")
        test = [Example(PROMPT.format(labels=", ".join(ex.options), text=ex.input.strip()), ex.output, ex.options)
                for ex in test]
        tasks.append(Task(name, [], test, metric="choice"))
    mmlu, _ = seeded_sample(load_file(data / "probe_mmlu" / "test.jsonl", **fields), items, "mmlu/test")
    mmlu = [Example(PROBE.format(input=ex.input, choices=" | ".join(ex.options)), ex.output, ex.options)
            for ex in mmlu]
    tasks.append(Task("mmlu", [], mmlu, metric="choice"))
    return tasks


def landed_logliks(model, tokenizer, task, batch_size: int) -> list[list[float]]:
    """The scorer as landed before shared prefixes (kept here as the baseline): every option
    re-encoded with its prompt, right-padded batches sorted by length, a float32
    log-softmax over the vocabulary at every position."""
    import torch
    import torch.nn.functional as F

    from retain.evaluation.scoring import encode_pair

    pairs, owners = [], []
    for k, ex in enumerate(task.test):
        for option in ex.options:
            pairs.append(encode_pair(tokenizer, task.prompt(tokenizer, ex), task.target(option)))
            owners.append(k)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    scores = [0.0] * len(pairs)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            width = max(len(pairs[i][0]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(pairs[i][0])] = torch.tensor(pairs[i][0])
                mask[row, : len(pairs[i][0])] = 1
            logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1], dim=-1)
            tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for row, i in enumerate(idx):
                end, n = len(pairs[i][0]) - 1, pairs[i][1]
                scores[i] = tok[row, end - n: end].sum().item()
    out: list[list[float]] = [[] for _ in task.test]
    for owner, s in zip(owners, scores):
        out[owner].append(s)
    return out


def _child(kind: str, model_spec: str, data: str, items: int, batch_size: int, queue) -> None:
    import torch

    from retain.evaluation.scoring import choice_logliks, eval_mode
    from retain.models import load_model

    model, tok = load_model(model_spec)
    tasks = build_tasks(Path(data), items)
    start = time.perf_counter()
    if kind == "train":
        from peft import LoraConfig, get_peft_model

        from retain.batching import collate

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        items_ = [it for t in tasks for it in t.items(tok, t.test)]
        model.train()
        for step in range(10):
            batch = collate(tok, [items_[(step * 8 + j) % len(items_)] for j in range(8)], 256)
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        result = {"steps": 10}
    elif kind == "harness":
        from retain.evaluation import harness

        result = harness.evaluate(model, tok, [harness.PREFIX + t.name for t in tasks], {t.name: t for t in tasks},
                                  batch_size=batch_size)
    else:
        result = {}
        with eval_mode(model):
            for t in tasks:
                if kind == "landed":
                    result[t.name] = landed_logliks(model, tok, t, batch_size)
                else:
                    result[t.name] = choice_logliks(model, tok, t, t.test, batch_size)
    seconds = time.perf_counter() - start
    queue.put({"seconds": round(seconds, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                   / 1024, 1), "result": result})


def measure(kind: str, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, args.model, str(args.data), args.items, args.batch_size, queue))
    proc.start()
    while proc.is_alive() or not queue.empty():
        try:
            out = queue.get(timeout=5)
        except Exception:  # noqa: BLE001 - queue.Empty: the child is still working
            continue
        proc.join()
        return out
    raise RuntimeError(f"the {kind} measurement failed (exit code {proc.exitcode}); see its traceback above")


def summarize(data: dict, tasks) -> str:
    from retain.evaluation.scoring import pick

    lines = ["# Choice scoring: the landed scorer against shared prefixes", "",
             f"{data['model']}, base model, {data['items']} items per task (seeded, label-stratified), eval "
             f"batch {data['batch_size']}; each scorer in its own process; {data['machine']['date']}, "
             f"{data['machine']['cpu_count']} CPU cores.", "",
             "| task | options | landed acc | retain acc | retain acc_norm | predictions equal | max |dlogp| |",
             "|---|---|---|---|---|---|---|"]
    landed, new = data["parts"]["landed"]["result"], data["parts"]["retain"]["result"]
    all_equal = True
    for t in tasks:
        a, b = landed[t.name], new[t.name]
        gold = [ex.answer_index for ex in t.test]
        acc_l = 100 * sum(pick(x, ex.options) == g for x, ex, g in zip(a, t.test, gold)) / len(gold)
        acc_n = 100 * sum(pick(x, ex.options) == g for x, ex, g in zip(b, t.test, gold)) / len(gold)
        norm = 100 * sum(pick(x, ex.options, True) == g for x, ex, g in zip(b, t.test, gold)) / len(gold)
        same = all(pick(x, ex.options) == pick(y, ex.options) and pick(x, ex.options, True) == pick(y, ex.options, True)
                   for x, y, ex in zip(a, b, t.test))
        all_equal &= same
        diff = max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x, y))
        lines.append(f"| {t.name} | {len(t.test[0].options)} | {acc_l:.1f} | {acc_n:.1f} | {norm:.1f} | "
                     f"{'yes' if same else 'NO'} | {diff:.1e} |")
    p = data["parts"]
    lines += ["", "| | seconds | peak RSS MB |", "|---|---|---|",
              f"| landed scorer | {p['landed']['seconds']} | {p['landed']['peak_rss_mb']} |",
              f"| shared-prefix scorer | {p['retain']['seconds']} | {p['retain']['peak_rss_mb']} |",
              f"| LoRA training, 10 steps of batch 8 (the training peak) | {p['train']['seconds']} | "
              f"{p['train']['peak_rss_mb']} |"]
    if "harness" in p:
        h = p["harness"]
        lines[-1:-1] = [f"| lm-evaluation-harness (HFLM, the same requests) | {h['seconds']} | {h['peak_rss_mb']} |"]
        lines += ["", "| task | retain acc | lm-eval acc | retain acc_norm | lm-eval acc_norm |", "|---|---|---|---|---|"]
        for t in tasks:
            ours = new[t.name]
            gold = [ex.answer_index for ex in t.test]
            acc = 100 * sum(pick(x, ex.options) == g for x, ex, g in zip(ours, t.test, gold)) / len(gold)
            norm = 100 * sum(pick(x, ex.options, True) == g for x, ex, g in zip(ours, t.test, gold)) / len(gold)
            theirs = h["result"][f"retain_{t.name}"]
            lines.append(f"| {t.name} | {acc:.1f} | {theirs['acc']:.1f} | {norm:.1f} | {theirs['acc_norm']:.1f} |")
        lines += ["", f"retain's scorer against lm-eval on the same requests: {h['seconds'] / p['retain']['seconds']:.1f}x "
                  "faster."]
    lines += ["",
              f"Speed-up: {p['landed']['seconds'] / p['retain']['seconds']:.1f}x; every prediction equal: "
              f"{'yes' if all_equal else 'no'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--items", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--fresh", action="store_true", help="measure again what the results file already holds")
    args = ap.parse_args()
    path = RESULTS / "eval-speed.json"
    data = json.loads(path.read_text()) if path.is_file() and not args.fresh else {}
    if {k: data.get(k) for k in ("model", "items", "batch_size")} != {"model": args.model, "items": args.items,
                                                                     "batch_size": args.batch_size}:
        data = {"model": args.model, "items": args.items, "batch_size": args.batch_size, "parts": {}}
    from retain.io import atomic_write_json

    for kind in ("retain", "landed", "train", "harness"):
        if kind not in data["parts"]:
            print(f"measuring {kind} ...", flush=True)
            data["parts"][kind] = measure(kind, args)
            atomic_write_json(path, data)
    data["machine"] = machine()
    write("eval-speed", data, summarize(data, build_tasks(args.data, args.items)))


if __name__ == "__main__":
    main()
