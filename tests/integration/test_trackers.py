"""`trackers:` through Accelerate on tiny-random: what each tracker stored, read back with its own library."""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile

import pytest

from tests.integration.test_handover import make_run

# trackio reads its store's folder once, at import: keep this test's projects out of the home folder.
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="retain-trackio-"))
for module in ("tensorboard", "mlflow", "wandb", "trackio"):
    pytest.importorskip(module)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("trackers"), "tracked", "lora",
                   trackers=["tensorboard", "mlflow", "wandb", "trackio"])
    return run, json.loads((run / "results.json").read_text())


def test_tensorboard_events_hold_loss_R_metrics_and_plots(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, results = tracked
    events = EventAccumulator(str(run / "trackers" / "tracked"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 7))  # 3 steps per task, 2 tasks, global steps
    assert {"train/lr", "R/upper", "R/small", "metrics/AA", "metrics/BWT"} <= set(tags["scalars"])
    # R/<task> at step 0 is the base model's score, then one point per phase end.
    small = events.Scalars("R/small")
    assert [e.step for e in small] == [0, 3, 6]
    assert [round(e.value, 3) for e in small] == [round(v, 3) for v in
                                                 [results["base"][1], results["R"][0][1], results["R"][1][1]]]
    assert events.Scalars("metrics/AA")[0].value == pytest.approx(results["metrics"]["AA"], abs=1e-4)
    assert any(t.startswith("plots/") for t in tags["images"])


def test_mlflow_file_store_holds_the_params_and_scalars(tracked):
    from mlflow.tracking import MlflowClient

    run, results = tracked
    client = MlflowClient(tracking_uri=(run / "trackers" / "mlruns").resolve().as_uri())
    [found] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert found.data.params["strategy"] == "lora" and found.data.params["train.max_steps"] == "3"
    assert len(client.get_metric_history(found.info.run_id, "train/loss")) == 6
    assert found.data.metrics["metrics/AA"] == pytest.approx(results["metrics"]["AA"], abs=1e-4)
    artifacts = [a.path for a in client.list_artifacts(found.info.run_id, "plots")]
    assert any(a.endswith(".png") for a in artifacts)


def test_wandb_offline_run_and_trackio_database_are_written(tracked):
    run, _ = tracked
    offline = list((run / "trackers" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    from trackio.utils import TRACKIO_DIR

    with sqlite3.connect(TRACKIO_DIR / "tracked.db") as conn:
        rows = conn.execute("select metrics from metrics").fetchall()
    logged = [json.loads(r[0]) for r in rows]
    assert sum("train/loss" in m for m in logged) == 6
    assert any("metrics/AA" in m for m in logged)


def test_a_missing_tracker_package_is_refused_before_anything_runs(tmp_path, monkeypatch):
    import importlib.util

    from retain.errors import RetainError
    from retain.tracking import check

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RetainError, match=r"trackers: wandb not installed; pip install 'retain\[trackers\]'"):
        check(["tensorboard", "wandb"])
