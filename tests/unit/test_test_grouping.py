"""The suite's own scheduling: `make test` relies on `--dist loadgroup` keeping each
`xdist_group` on one worker (the data-parallel and sharded launches are module fixtures that
cost a minute each, and the Ray/federated tests must not start clusters side by side).
pytest 9 with pytest-xdist 3.8 silently stopped doing that; this catches any such upgrade."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")

GROUPED = """
import os, pytest
pytestmark = pytest.mark.xdist_group("together")

@pytest.mark.parametrize("i", range(4))
def test_grouped(i):
    print("WORKER", os.environ["PYTEST_XDIST_WORKER"])
"""

FREE = """
import pytest

@pytest.mark.parametrize("i", range(4))
def test_free(i):
    pass
"""


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path: Path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_free.py").write_text(FREE)
    run = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
                          "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    grouped = [line for line in run.stdout.splitlines()
               if line.startswith("[gw") and "PASSED" in line and "test_grouped" in line]
    assert len(grouped) == 4, run.stdout
    workers = {line.split()[0] for line in grouped}
    assert len(workers) == 1, f"the group ran on {sorted(workers)}: pin pytest/pytest-xdist (see pyproject)"
