"""Study arms and seeds dispatched as Ray tasks (``--ray``) on a local two-node cluster."""

from __future__ import annotations

import json
import os

import pytest
import yaml

import retain.loop as loop
from retain.errors import RetainError
from tests.conftest import die_at, run_figures

pytestmark = pytest.mark.xdist_group("distributed")


class Killed(Exception):
    pass


def _study(tiny_config, tmp_path):
    analysis = {"enabled": True, "every": 2, "kl_prompts": 2}
    over = dict(analysis=analysis, train__max_steps=4, train__checkpoint_every=2, eval__probe_max=4)
    tiny_config("a", **over)
    tiny_config("b", strategy="lora", seeds=[0, 1], **over)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "out"), "arms": ["a.yaml", "b.yaml"]}))
    return study


def test_arms_and_seeds_train_at_once_on_two_nodes_and_a_killed_arm_resumes(tiny_config, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is optional (pip install 'retain[ray]')")
    from ray.cluster_utils import Cluster

    from retain.dispatch import RayOptions
    from retain.reporting import load_results
    from retain.study import run_study

    study = _study(tiny_config, tmp_path)
    run_study(study, quiet=True, name="here")  # the reference: every arm in this process, in turn
    # Arm a killed here inside its second task: the cluster must resume it, not start it over.
    die_at(monkeypatch, loop.Run, "gradient_step", 7, Killed)
    with pytest.raises(Killed):
        run_study(study, quiet=True)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert (out / "s" / "a" / "checkpoints" / "state.json").is_file() and not (out / "s" / "b").exists()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        report = run_study(study, quiet=True, ray=RayOptions(cluster.address, cpus=1))
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)  # the cluster is gone; later Rays in this process start their own
    records = {r["run"].split("/out/s/")[1]: r for r in json.loads((out / "s" / "dispatch.json").read_text())}
    assert sorted(records) == ["a", "b/seed-0", "b/seed-1"]
    assert records["a"]["resumed"] and not records["b/seed-0"]["resumed"]
    assert len({r["node"] for r in records.values()}) == 2  # one CPU per node: the runs spread
    for run in ("a", "b/seed-0", "b/seed-1"):
        assert run_figures(load_results(out / "s" / run)) == run_figures(load_results(out / "here" / run))
    assert json.loads((out / "s" / "b" / "aggregate.json").read_text())["seeds"] == [0, 1]
    assert "| a |" in report.read_text() and "| b/seed-1 |" in report.read_text()


def test_a_request_no_node_can_meet_is_refused_before_anything_runs(tiny_config, tmp_path):
    pytest.importorskip("ray", reason="Ray is optional (pip install 'retain[ray]')")
    from retain.dispatch import RayOptions
    from retain.study import run_study

    study = _study(tiny_config, tmp_path)
    with pytest.raises(RetainError, match=r"--gpus-per-run 1: no node of the Ray cluster has that much "
                                          r"\(its nodes: \d+ CPU / 0 GPU\)"):
        run_study(study, quiet=True, ray=RayOptions("local", cpus=1, gpus=1))
    assert not (tmp_path / "out").exists()


def test_ray_flags_are_checked_on_the_command_line(tiny_config, monkeypatch):
    import builtins

    from typer.testing import CliRunner

    from retain.cli import app

    config = str(tiny_config("one"))
    runner = CliRunner()

    def refused(*args) -> str:
        result = runner.invoke(app, list(args))
        assert isinstance(result.exception, RetainError), result.output
        return str(result.exception)

    assert "--ray dispatches the seeds of a multi-seed run" in refused("run", config, "--ray", "local")
    assert "apply to runs dispatched with --ray ADDRESS" in refused("run", config, "--gpus-per-run", "1")
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "ray" else real(name, *a, **k))
    assert "pip install 'retain[ray]'" in refused("run", config, "--seeds", "0,1", "--ray", "local")


def test_ray_local_starts_its_own_ray_beside_a_running_cluster(monkeypatch):
    """``--ray local`` must not join the cluster this machine last recorded (Ray's default for
    an address of None): that cluster's workers lack this process's environment."""
    ray = pytest.importorskip("ray", reason="Ray is optional (pip install 'retain[ray]')")
    from ray.cluster_utils import Cluster

    import retain.dispatch as dispatch

    seen = []
    monkeypatch.setattr(dispatch, "check_resources",
                        lambda ray, cpus, gpus: seen.append(ray.get_runtime_context().gcs_address))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    recorded = cluster.address  # (None once it is shut down)
    try:
        with dispatch.connected(dispatch.RayOptions("local", cpus=1)):
            pass
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert recorded and seen and seen[0] != recorded
