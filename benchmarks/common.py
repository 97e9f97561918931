"""Shared helpers for the benchmark scripts: machine description and result files."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
    }


def write(name: str, data: dict, markdown: str) -> None:
    from retain.io import atomic_write_json, atomic_write_text

    atomic_write_json(RESULTS / f"{name}.json", data)
    atomic_write_text(RESULTS / f"{name}.md", markdown)
    print(markdown)
