"""Federated phases on Flower's deployment engine: a SuperLink and SuperNodes as separate processes.

Each phase is a Flower App run submitted with ``flwr run`` to the SuperLink at
``federated.superlink``. The app (written to ``<run>/federated/app/``) is two lines of
glue: its ServerApp runs ``serve_rounds`` in the SuperLink's ServerApp process, its
ClientApp is retain's, run by every SuperNode. The phase's inputs (the global adapter, the
clients' state) and outputs pass through ``<run>/federated/phase-<i>/``, so the SuperLink's
machine must see the run directory (it does on one machine; on several, share it), and
every SuperNode needs retain, the model and the data at the config's paths.

Start the federation yourself (one SuperNode per client, each with its partition):

    flower-superlink --insecure
    flower-supernode --insecure --superlink 127.0.0.1:8000 --port 9094 \\
        --node-config "partition-id=0 num-partitions=2"
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from retain.errors import RetainError
from retain.io import atomic_write_json, atomic_write_text

APP_MODULE = "retain_flower_app"
APP_PYPROJECT = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "retain-federated"
version = "1.0.0"
description = "retain's federated continual learning phase (written by retain run)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "retain"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:server"
clientapp = "{APP_MODULE}:client"

[tool.flwr.app.config]
work = ""
"""
APP_CODE = '''"""Glue written by retain: the phase's server and retain's client."""
from retain.federated import client_app
from retain.federated_deploy import server_app

server = server_app()
client = client_app()
'''


def server_app():
    """The ServerApp the SuperLink runs: read the phase's inputs, serve its rounds, write the outcome."""
    from flwr.serverapp import ServerApp

    from retain.federated import serve_rounds

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        work = Path(str(context.run_config["work"]))
        spec = json.loads((work / "input.json").read_text(encoding="utf-8"))
        initial = load_file(str(work / "initial.safetensors"))
        result = serve_rounds(grid, spec["config"], spec["phase"], initial, spec["states"])
        if result["arrays"] is not None:
            save_file({k: v.contiguous() for k, v in result["arrays"].items()}, str(work / "global.safetensors"))
        atomic_write_json(work / "output.json", {k: result[k] for k in ("rounds", "states", "scores")})

    return app


def flwr_executable() -> str:
    found = Path(sys.executable).parent / "flwr"
    return str(found) if found.exists() else (shutil.which("flwr") or "flwr")


def deploy(run_dir: Path, superlink: str, insecure: bool, root_certificates: str | None, config_text: str,
           phase: int, initial: dict[str, torch.Tensor], states: dict[str, Any]) -> dict[str, Any]:
    """Submit one phase to the SuperLink and wait for it; the same result as ``simulate``."""
    base = Path(run_dir).resolve() / "federated"
    app, home, work = base / "app", base / "flwr-home", base / f"phase-{phase + 1}"
    for folder in (app, home, work):
        folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(app / "pyproject.toml", APP_PYPROJECT)
    atomic_write_text(app / f"{APP_MODULE}.py", APP_CODE)
    connection = f'address = "{superlink}"\n' + ("insecure = true\n" if insecure else
                                                  f'root-certificates = "{root_certificates}"\n')
    atomic_write_text(home / "config.toml", f'[superlink]\ndefault = "retain"\n\n[superlink.retain]\n{connection}')
    for stale in ("output.json", "global.safetensors"):
        (work / stale).unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in initial.items()}, str(work / "initial.safetensors"))
    atomic_write_json(work / "input.json", {"config": config_text, "phase": phase, "states": states})
    log = work / "flwr.log"
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run([flwr_executable(), "run", str(app), "retain", "--run-config", f'work="{work}"',
                               "--stream"], env={**os.environ, "FLWR_HOME": str(home)}, stdout=out,
                              stderr=subprocess.STDOUT, cwd=str(app))
    if not (work / "output.json").is_file():
        tail = log.read_text(encoding="utf-8", errors="replace")[-1500:]
        raise RetainError(f"federated: phase {phase + 1} on the SuperLink at {superlink} did not finish "
                          f"(flwr run exited {done.returncode}; its log: {log}):\n{tail}")
    result = json.loads((work / "output.json").read_text(encoding="utf-8"))
    weights = work / "global.safetensors"
    result["arrays"] = load_file(str(weights)) if weights.is_file() else None
    return result
