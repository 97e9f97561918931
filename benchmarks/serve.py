"""`retain serve` against a plain transformers generate loop, on the embedded model.

One short ``lora-per-task`` run on the ``numbers`` stream gives four task adapters (their
quality is not the point: 5 steps per task). The same requests (the stream's test inputs,
greedy, 16 new tokens) are then answered

- by a plain loop: PEFT ``set_adapter`` and ``generate`` one request at a time, in-process;
- by ``retain serve`` in its own process over HTTP, with 1 and 8 concurrent clients, all
  requests to one adapter or spread round-robin over the four.

Reported: requests/s, generated tokens/s and latency (median, 95th percentile) per setting.
A setting's clients start together and each sends its share of the requests one after another.

    .venv/bin/python benchmarks/serve.py [--requests 32]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import machine, runs_dir, write

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 16


def trained_run(out: Path) -> Path:
    run = out / "serve-bench"
    if not (run / "results.json").is_file():
        retain = str(Path(sys.executable).parent / "retain")
        subprocess.run([retain, "run", str(ROOT / "configs" / "lora-per-task.yaml"), "name=serve-bench", f"output_dir={out}", "train.max_steps=5", "eval.probe=false",
                        "eval.max_test=8", "--overwrite", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return run


def requests_for(handed, count: int, adapters: list[str]) -> list[tuple[str, str]]:
    """(adapter, prompt) pairs: each adapter's own task's test inputs, in its task's prompt format."""
    from retain.streams.task import Example

    tasks = {t.name: t for t in handed.ctx.stream.tasks}
    out = []
    for i in range(count):
        name = adapters[i % len(adapters)]
        ex = tasks[name].test[i // len(adapters) % len(tasks[name].test)]
        out.append((name, tasks[name].prompt(handed.ctx.tokenizer, Example(ex.input, ""))))
    return out


def plain_loop(handed, asks: list[tuple[str, str]]) -> dict:
    """The baseline: one generate call per request, the adapter switched with PEFT's set_adapter."""
    import torch

    from retain.serve import encode

    model, tok = handed.ctx.model, handed.ctx.tokenizer
    latencies, tokens = [], 0
    start = time.perf_counter()
    for adapter, prompt in asks:
        t = time.perf_counter()
        model.set_adapter(adapter)
        ids = torch.tensor([encode(tok, prompt)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        tokens += out.shape[1] - ids.shape[1]
        latencies.append(time.perf_counter() - t)
    return summary(latencies, tokens, time.perf_counter() - start)


def summary(latencies: list[float], tokens: int, wall: float) -> dict:
    ordered = sorted(latencies)
    return {"requests": len(latencies), "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "latency_p50_s": round(statistics.median(ordered), 3),
            "latency_p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)}


def served(url: str, asks: list[tuple[str, str]], clients: int) -> dict:
    import httpx

    def client(share: list[tuple[str, str]]) -> tuple[list[float], int]:
        lat, toks = [], 0
        with httpx.Client(timeout=600) as http:
            for adapter, prompt in share:
                t = time.perf_counter()
                r = http.post(f"{url}/v1/completions", json={"model": adapter, "prompt": prompt,
                                                             "max_tokens": TOKENS, "temperature": 0})
                r.raise_for_status()
                toks += r.json()["usage"]["completion_tokens"]
                lat.append(time.perf_counter() - t)
        return lat, toks

    shares = [asks[i::clients] for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, shares))
    wall = time.perf_counter() - start
    return summary([x for lat, _ in results for x in lat], sum(t for _, t in results), wall)


def start_server(run: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "retain"), "serve", str(run), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("retain serve did not start within 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32, help="requests per setting and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each setting is measured once per round")
    ap.add_argument("--out", default=str(runs_dir("serve")),
                    help="run directories (default: $RETAIN_BENCH_DIR/serve or ~/.cache/retain/bench/serve)")
    args = ap.parse_args()
    from retain.handover import load

    run = trained_run(Path(args.out))
    handed = load(run)
    tasks = handed.ctx.stream.task_names
    settings = {"1 adapter": tasks[:1], "4 adapters": tasks}
    asks = {k: requests_for(handed, args.requests, v) for k, v in settings.items()}
    handed.ctx.model.generate(input_ids=__import__("torch").tensor([[1, 2, 3]]), max_new_tokens=2)  # warm-up
    rounds: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for k, a in asks.items():
            rounds.setdefault(f"plain loop, {k}", []).append(plain_loop(handed, a))
    del handed
    proc, url = start_server(run)
    try:
        served(url, asks["1 adapter"][:4], 1)  # warm-up
        for _ in range(args.rounds):
            for k, a in asks.items():
                for clients in (1, 8):
                    name = f"retain serve, {k}, {clients} client{'s' if clients > 1 else ''}"
                    rounds.setdefault(name, []).append(served(url, a, clients))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # Each figure: the median round (by requests/s) with the range of requests/s over the rounds.
    rows = {}
    for name, rs in rounds.items():
        ordered = sorted(rs, key=lambda r: r["requests_per_s"])
        rows[name] = {**ordered[len(ordered) // 2], "requests_per_s_range": [ordered[0]["requests_per_s"],
                                                                           ordered[-1]["requests_per_s"]]}
    plain = {k: rows[f"plain loop, {k}"]["requests_per_s"] for k in settings}
    m = machine()
    head = ["setting", "requests/s (range)", "× plain loop", "tokens/s", "latency p50 s", "latency p95 s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, r in rows.items():
        lo, hi = r["requests_per_s_range"]
        base = plain["4 adapters" if "4 adapters" in k else "1 adapter"]
        lines.append(f"| {k} | {r['requests_per_s']:.2f} ({lo:.2f}-{hi:.2f}) | {r['requests_per_s'] / base:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} |")
    md = "\n".join([
        "# `retain serve` against a plain generate loop", "",
        f"{m['device']}, {m['torch_threads']} threads, {m['date']}. SmolLM2-135M-Instruct with the four task "
        f"adapters of a short `lora-per-task` run on `numbers`; {args.requests} requests per setting and round, "
        f"{args.rounds} rounds (each row: the median round, with the range of requests/s over rounds; the tasks' "
        f"test prompts), greedy, {TOKENS} new tokens at most. The plain loop runs in-process, one request at a "
        "time; `retain serve` runs in its own process, its clients in this one over HTTP on localhost.", "",
        *lines, ""])
    write("serve", {"machine": m, "requests": args.requests, "rounds": args.rounds, "max_tokens": TOKENS,
                    "rows": rows, "all_rounds": rounds}, md)


if __name__ == "__main__":
    main()
