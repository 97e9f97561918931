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
        "cpu": cpu_name(),
        # The machines of one kind differ in CPU: bf16 autocast is ~2x faster than fp32 on one
        # with AVX512-BF16 and several times slower on an AVX2-only one.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        "python": platform.python_version(),
    }


def runs_dir(name: str) -> Path:
    """Where a suite's run directories (with their checkpoints) go: ``$RETAIN_BENCH_DIR/<name>``,
    by default under retain's cache (~/.cache/retain/bench), outside the source tree, so that a
    new checkout on the same machine finds a killed run's checkpoints and resumes it, and
    multi-GB full fine-tuning checkpoints stay out of the repository's folder."""
    from retain.models.loader import cache_dir

    return Path(os.environ.get("RETAIN_BENCH_DIR") or cache_dir() / "bench") / name


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write(name: str, data: dict, markdown: str) -> None:
    from retain.io import atomic_write_json, atomic_write_text

    atomic_write_json(RESULTS / f"{name}.json", data)
    atomic_write_text(RESULTS / f"{name}.md", markdown)
    print(markdown)
