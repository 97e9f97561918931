"""Build the compact benchmark copies shipped in ``retain/streams/data/benchmarks``.

Reads the shared JSONL copies (``../shared/data``; schema and origin in their SOURCES.md)
and writes one gzip'd JSONL file per split, keeping only the fields ``retain`` reads.
Every item is kept (``--max-train`` caps train splits with a seeded sample kept in file
order, for a smaller package). Yahoo's LFPT5 label strings are
mapped to O-LoRA's ``labels.json`` names, so shipped data and an O-LoRA ``data_dir`` give
the same label set. Deterministic: the same input gives byte-identical files.

    python scripts/build_benchmark_data.py ../shared/data src/retain/streams/data/benchmarks
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
from pathlib import Path

KEEP = ("input", "output", "options", "option_labels", "subject", "activity_label", "instruction", "final_answer")
YAHOO = {
    "society and culture": "Society & Culture", "science": "Science & Mathematics", "health": "Health",
    "education and reference": "Education & Reference", "computers and internet": "Computers & Internet",
    "sports": "Sports", "business": "Business & Finance", "entertainment and Music": "Entertainment & Music",
    "family and relationships": "Family & Relationships", "politics and government": "Politics & Government",
}


def records(path: Path) -> list[dict]:
    # One record per line split on "\n" only: texts hold U+2028, which str.splitlines splits on.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def compact(name: str, rec: dict) -> dict:
    out = {k: rec[k] for k in KEEP if k in rec}
    # SuperNI's other references, kept only where there are others (a few tasks have them).
    others = [o for o in rec.get("all_outputs") or [] if o != rec.get("output")]
    if others:
        out["all_outputs"] = rec["all_outputs"]
    if name == "cl15_yahoo":
        out["output"] = YAHOO[out["output"]]
        out["options"] = [YAHOO[o] for o in out["options"]]
    return out


def write(path: Path, rows: list[dict]) -> None:
    # mtime=0: the gzip header carries no timestamp, so rebuilding changes no bytes.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--skip", nargs="*", default=["countdown", "countdown_cd3"],
                        help="folders no named stream or probe reads")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in args.source.iterdir() if p.is_dir() and p.name not in args.skip):
        for split in ("train", "test"):
            path = folder / f"{split}.jsonl"
            rows = [compact(folder.name, r) for r in records(path)] if path.exists() else []
            if split == "train" and args.max_train and len(rows) > args.max_train:
                keep = sorted(random.Random(f"{folder.name}/train").sample(range(len(rows)), args.max_train))
                rows = [rows[i] for i in keep]
            write(args.out / f"{folder.name}.{split}.jsonl.gz", rows)
    shutil.copyfile(args.source / "SOURCES.md", args.out / "SOURCES.md")


if __name__ == "__main__":
    main()
