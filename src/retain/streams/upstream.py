"""Readers of the benchmarks' own release layouts, for ``stream: {name: ..., data_dir: ...}``.

A full copy of a benchmark (more items than the shipped compact copies) is read where its
authors put it: O-LoRA's and SAPT's ``CL_Benchmark/<group>/<task>/{train,dev,test}.json``
(a JSON list of ``{"sentence", "label"}`` with ``labels.json``; SuperNI task files with
``Definition`` and ``Instances``) and TRACE's ``LLM-CL-Benchmark_<size>/<task>/{train,eval,
test}.json`` (a JSON list of ``{"prompt", "answer"}``). Each record becomes the shipped
schema (``input``, ``output``, ``options``, ``instruction``), so prompts and metrics are the
same whichever copy a run reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TYPE_CHECKING

from retain.errors import RetainError
from retain.streams.loaders import _read_text

if TYPE_CHECKING:
    from retain.streams.benchmarks import Dataset

Rows = list[tuple[str, dict[str, Any]]]
LAYOUTS = {"olora": "O-LoRA's CL_Benchmark/", "superni": "SAPT's CL_Benchmark/SuperNI/",
           "trace": "TRACE's LLM-CL-Benchmark_<size>/"}


def _json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise RetainError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def _list(path: Path, keys: tuple[str, str]) -> list[dict[str, Any]]:
    data = _json(path)
    if not isinstance(data, list):
        raise RetainError(f"{path}: expected a JSON list of records with {keys[0]!r} and {keys[1]!r}, "
                          f"got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or any(k not in rec for k in keys):
            present = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
            raise RetainError(f"{path}: record {i} needs fields {keys[0]!r} and {keys[1]!r} (has: {present})")
    return data


def _split(folder: Path, names: tuple[str, ...], layout: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise RetainError(f"{folder}: no {' or '.join(names)} ({LAYOUTS[layout]} layout)")


def _task_folder(data_dir: str, layout: str, upstream: str) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise RetainError(f"data_dir {data_dir} is not a folder")
    if layout in ("olora", "superni") and (root / "CL_Benchmark").is_dir():
        root = root / "CL_Benchmark"
    folder = root / upstream
    if not folder.is_dir():
        hint = "; point data_dir at one LLM-CL-Benchmark_<size> folder" if layout == "trace" else ""
        raise RetainError(f"data_dir {data_dir}: no folder {upstream} (expected {LAYOUTS[layout]} layout{hint})")
    return folder


def _olora(folder: Path, dataset: "Dataset") -> tuple[Rows, Rows]:
    labels_path = folder / "labels.json"
    if not labels_path.is_file():
        raise RetainError(f"{folder}: no labels.json (the task's label set, in O-LoRA's layout)")
    labels = _json(labels_path)
    if not isinstance(labels, list) or len(labels) < 2:
        raise RetainError(f"{labels_path}: expected a JSON list of at least 2 labels")
    out = []
    for names in (("train.json",), ("test.json", "dev.json")):
        path = _split(folder, names, "olora")
        out.append([(f"{path} record {i}", {"input": r["sentence"], "output": r["label"], "options": list(labels)})
                    for i, r in enumerate(_list(path, ("sentence", "label")))])
    return out[0], out[1]


def _superni(folder: Path) -> tuple[Rows, Rows]:
    out = []
    for name in ("train.json", "test.json"):
        path = _split(folder, (name,), "superni")
        data = _json(path)
        if not isinstance(data, dict) or "Instances" not in data:
            raise RetainError(f"{path}: expected a SuperNI task file (an object with 'Definition' and 'Instances')")
        definition = data.get("Definition") or [""]
        rows = []
        for i, inst in enumerate(data["Instances"]):
            outputs = inst.get("output") if isinstance(inst, dict) else None
            if not outputs or "input" not in inst:
                raise RetainError(f"{path}: instance {i} needs 'input' and a non-empty 'output' list")
            output = outputs[0] if isinstance(outputs, list) else outputs
            others = outputs if isinstance(outputs, list) and len(outputs) > 1 else None
            rows.append((f"{path} instance {i}", {"input": inst["input"], "output": output,
                                                  "instruction": definition[0],
                                                  **({"all_outputs": others} if others else {})}))
        out.append(rows)
    return out[0], out[1]


def _trace(folder: Path, dataset: "Dataset") -> tuple[Rows, Rows]:
    out = []
    for names in (("train.json",), ("test.json",)):
        path = _split(folder, names, "trace")
        rows = []
        for i, rec in enumerate(_list(path, ("prompt", "answer"))):
            row = {"input": rec["prompt"], "output": rec["answer"]}
            if dataset.options is not None:
                row["options"] = list(dataset.options)
            rows.append((f"{path} record {i}", row))
        out.append(rows)
    return out[0], out[1]


def read_upstream(layout: str, data_dir: str, dataset: "Dataset") -> tuple[Rows, Rows]:
    """Train and test records of one task, in the shipped schema."""
    folder = _task_folder(data_dir, layout, dataset.upstream)
    if layout == "olora":
        return _olora(folder, dataset)
    if layout == "superni":
        return _superni(folder)
    return _trace(folder, dataset)
