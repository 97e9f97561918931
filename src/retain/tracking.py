"""Experiment trackers (``trackers: [tensorboard, mlflow, wandb, trackio]``) through Accelerate.

Accelerate's tracker API does the logging; this module decides what is logged and where:
the resolved config (flattened to dotted keys), each step's loss and learning rate, each
phase's row of R, the probe (mean and per suite), the update analysis, the final metrics and
the report's plots as images. TensorBoard, MLflow and W&B write under ``<run>/trackers/``
unless their own environment says otherwise (``MLFLOW_TRACKING_URI``, ``WANDB_DIR``);
trackio keeps every project in its own store (``TRACKIO_DIR``, by default
``~/.cache/huggingface/trackio``), where ``trackio show`` finds them. W&B runs offline unless
``WANDB_MODE`` says otherwise, so a run needs no account and no network; ``wandb sync
<run>/trackers/wandb/offline-run-*`` uploads it later.

A resumed run opens new tracker runs and keeps logging at the global step it resumes from.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from retain.errors import RetainError

#: tracker -> the module it needs (each an optional extra: ``pip install 'retain[trackers]'``).
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}


def check(names: list[str]) -> None:
    """Refuse, before the model loads, a tracker whose package is not installed."""
    missing = [n for n in names if importlib.util.find_spec(MODULES[n]) is None]
    if missing:
        raise RetainError(f"trackers: {', '.join(missing)} not installed; pip install 'retain[trackers]' "
                          f"(or {' '.join(MODULES[m] for m in missing)})")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys with scalar values: what every tracker accepts as hyper-parameters."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value
        else:
            out[name] = str(value)
    return out


def scalars(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numeric entries of a record (update analysis, probe suites), under ``prefix/``."""
    return {f"{prefix}/{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


class Tracking:
    """Feeds the run's figures to the Accelerator's trackers; does nothing without trackers."""

    def __init__(self, accelerator, config, run_dir: Path) -> None:
        self.accelerator, self.run_dir = accelerator, Path(run_dir)
        # Only the main process of a data-parallel run logs (Accelerate's trackers live there).
        self.names = list(config.trackers) if accelerator.is_main_process else []
        if not self.names:
            return
        folder = self.run_dir / "trackers"
        folder.mkdir(parents=True, exist_ok=True)
        if "mlflow" in self.names and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            # A file store needs no server; MLflow 3 asks for this opt-in to keep one.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
        init = {"wandb": {"dir": os.environ.get("WANDB_DIR", str(folder)), "name": config.name,
                          "mode": os.environ.get("WANDB_MODE", "offline")},
                "mlflow": {"run_name": config.name}, "trackio": {"name": config.name}}
        accelerator.init_trackers(config.name, config=flatten(config.resolved()),
                                  init_kwargs={n: init[n] for n in self.names if n in init})

    def log(self, values: dict[str, float], step: int) -> None:
        if self.names and values:
            self.accelerator.log(values, step=step)

    def step(self, loss: float, lr: float | None, step: int) -> None:
        self.log({"train/loss": loss, **({"train/lr": lr} if lr is not None else {})}, step)

    def evaluation(self, tasks: list[str], row: list[float], probe: float | None, suites: dict[str, Any],
                   step: int) -> None:
        values = {f"R/{t}": float(v) for t, v in zip(tasks, row) if v is not None}
        if probe is not None:
            values["probe/mean"] = float(probe)
        values.update({f"probe/{name}": float(d["value"]) for name, d in suites.items()
                       if isinstance(d.get("value"), (int, float))})
        self.log(values, step)

    def updates(self, record: dict[str, Any], step: int) -> None:
        self.log(scalars({k: v for k, v in record.items() if k not in ("phase", "step", "global_step")}, "updates"),
                 step)

    def finish(self, results: dict[str, Any], step: int) -> None:
        """The final metrics and the report's plots, then every tracker closes."""
        if not self.names:
            return
        metrics = scalars(results.get("metrics") or {}, "metrics")
        probe = results.get("probe") or {}
        metrics.update(scalars({k: probe.get(k) for k in ("base", "retention")}, "probe"))
        self.log(metrics, step)
        plots = sorted((self.run_dir / "plots").glob("*.png"))
        for tracker in self.accelerator.trackers:
            log_images(tracker, plots, step)
        self.accelerator.end_training()


def log_images(tracker, plots: list[Path], step: int) -> None:
    """Each tracker's own way to store a picture (Accelerate has no common call for all four)."""
    if not plots:
        return
    if tracker.name == "mlflow":
        import mlflow

        for path in plots:
            mlflow.log_artifact(str(path), artifact_path="plots")
        return
    if tracker.name == "trackio":
        import trackio

        tracker.log({f"plots/{p.stem}": trackio.Image(str(p)) for p in plots}, step=step)
        return
    import matplotlib.image as mpimg
    import numpy as np

    images = {f"plots/{p.stem}": (mpimg.imread(p)[..., :3] * 255).astype(np.uint8) for p in plots}
    if tracker.name == "tensorboard":
        tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
    elif tracker.name == "wandb":
        tracker.log_images({k: [v] for k, v in images.items()}, step=step)
