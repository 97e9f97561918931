"""What per-item records cost a run: time to encode them and to derive intervals, and bytes.

The scorer computes every item's score and answer anyway (a task's score is their mean);
the records add encoding them into results.json, the bootstrap intervals and the
forgotten-examples lists at the end of the run. This measures those against each run's own
wall time, on finished runs (results.json files), and the share of results.json they take.

    .venv/bin/python benchmarks/records_cost.py ~/.cache/retain/bench/published/standard-cl/*/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write  # noqa: E402


def main() -> None:
    from retain.evaluation.scoring import TaskScore
    from retain.evaluation.uncertainty import decode, intervals, item_record

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args()
    rows, data = [], {}
    for path in args.results:
        results = json.loads(path.read_text(encoding="utf-8"))
        evaluations = results["evaluations"]
        start = time.perf_counter()
        for e in evaluations:  # encode every item record again, as the loop does after each evaluation
            for record in (e.get("items") or {}).values():
                items = decode(record["scores"]).tolist()
                item_record(TaskScore(0.0, len(items), None, {}, items, record["answers"]))
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        intervals(results)
        intervals_s = time.perf_counter() - start
        full = len(path.read_bytes())
        bare = len(json.dumps({**results, "evaluations": [{k: v for k, v in e.items() if k != "items"}
                                                           for e in evaluations]}, indent=1).encode())
        share = 100 * (encode_s + intervals_s) / results["wall_s"]
        data[str(path)] = {"wall_s": results["wall_s"], "encode_s": encode_s, "intervals_s": intervals_s,
                           "share_percent": share, "bytes": full, "bytes_without_items": bare}
        rows.append(f"| {results['name']} | {results['wall_s']:.0f} | {encode_s * 1000:.1f} | {intervals_s:.2f} | "
                    f"{share:.3f}% | {full / 1024:.0f} KB | {(full - bare) / 1024:.0f} KB |")
    m = machine()
    md = "\n".join([
        "# What per-item records cost", "",
        f"{m['date']}, {m['cpu_count']} CPU cores ({m['device']}). Per run: its wall time, the time to encode "
        "every evaluation's item records and to compute the bootstrap intervals (2,000 resamples) at the end, "
        "their share of the wall time (target: at most 5%), and the bytes they add to results.json.", "",
        "| run | wall s | encode ms | intervals s | share of wall time | results.json | of it items |",
        "|---|---|---|---|---|---|---|", *rows, ""])
    write("records-cost", {"machine": m, "runs": data}, md)


if __name__ == "__main__":
    main()
