"""`train.sharding` (FSDP2 over 2 gloo processes on tiny-random) gives the one-process run:
the same losses, trained weights, adapters, R and probe, one copy of each file, and resumes
after a kill with 2 processes or with one; what cannot run sharded is refused before anything
runs, with the reason."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import small_options
from tests.integration.test_data_parallel import EXACT, KILL, assert_same_run, launch_all, run_name, torchrun
from retain import sharding
from retain.config import load_config
from retain.errors import RetainError
from retain.loop import check_run, execute, load_run_config, restore

#: One worker runs the module, so its 2-process launch (a module fixture) runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("sharding")
ROOT = Path(__file__).resolve().parents[2]
#: Every strategy declared to run sharded (``sharded = ""``) is checked here: lora and replay
#: inside lora+replay+ewc (and lora alone with zero2 through Accelerate, below), so that the
#: launch stays short.
SHARDED = ["naive", "ewc", "lora+replay+ewc", "joint", "rewarm+mix"]


def overrides(strategy: str, mode: str | None = "zero3") -> dict:
    over = {**EXACT, "strategy": strategy, **small_options(strategy)}
    return {**over, "train__sharding": mode} if mode else over


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    """Every SHARDED strategy with zero3, in one torchrun launch."""
    return launch_all(tmp_path_factory.mktemp("sharded"), {f"two-{run_name(s)}": overrides(s) for s in SHARDED})


def adapters(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): load_file(str(p)) for p in (run_dir / "adapters").rglob("*.safetensors")}


def assert_same_sharded_run(one: dict, two: dict, dir_one: Path, dir_two: Path, mode: str) -> None:
    assert one["sharding"] is None
    assert two["num_processes"] == 2 and two["sharding"] == mode
    assert_same_run(one, two, dir_one, dir_two)
    # Handed-over adapters are whole tensors, equal to the one-process run's.
    a, b = adapters(dir_one), adapters(dir_two)
    assert set(a) == set(b)
    for path in a:
        for key in a[path]:
            assert b[path][key].shape == a[path][key].shape
            assert (b[path][key] - a[path][key]).abs().max().item() < 5e-4, (path, key)


@pytest.mark.parametrize("strategy", SHARDED)
def test_a_sharded_run_gives_the_one_process_run(tiny_config, tmp_path, sharded_runs, strategy):
    one = execute(load_config(tiny_config("one", **overrides(strategy, None))), quiet=True)
    dir_two = sharded_runs / f"two-{run_name(strategy)}"
    two = json.loads((dir_two / "results.json").read_text())
    assert_same_sharded_run(one, two, tmp_path / "runs" / "one", dir_two, "zero3")
    if "ewc" in strategy:  # the Fisher, estimated by shard, has the one-process mean
        assert two["strategy_stats"][0]["ewc"]["fisher_mean"] == pytest.approx(
            one["strategy_stats"][0]["ewc"]["fisher_mean"], rel=1e-4)


def test_the_shipped_accelerate_config_runs_zero2(tiny_config, tmp_path):
    """`accelerate launch --config_file configs/accelerate/fsdp-zero2.yaml` (2 CPU processes here)."""
    one = execute(load_config(tiny_config("one", **overrides("lora", None))), quiet=True)
    config = ROOT / "configs" / "accelerate" / "fsdp-zero2.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m",
                           "retain.cli", "run", str(tiny_config("two", **overrides("lora", None))), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "runs" / "two" / "results.json").read_text())
    assert_same_sharded_run(one, two, tmp_path / "runs" / "one", tmp_path / "runs" / "two", "zero2")


def test_one_process_shards_into_one_and_gives_the_unsharded_run(tiny_config, tmp_path):
    """A sharded config run as one process (how the sharded path is checked on one GPU)."""
    over = overrides("lora+replay+ewc", None)
    one = execute(load_config(tiny_config("one", **over)), quiet=True)
    alone = execute(load_config(tiny_config("alone", **over, train__sharding="zero3")), quiet=True)
    assert alone["num_processes"] == 1 and alone["sharding"] == "zero3"
    assert_same_run(one, alone, tmp_path / "runs" / "one", tmp_path / "runs" / "alone")
    # `retain generate` / `serve` / `export` rebuild the run in one process, unsharded.
    ctx, _ = restore(tmp_path / "runs" / "alone")
    assert not sharding.is_sharded(ctx.model)


def test_a_killed_sharded_run_resumes_sharded_or_in_one_process(tiny_config, tmp_path):
    """Killed inside task 2: the resume loads EWC's Fisher and anchors of task 1 as shards."""
    over = overrides("lora+replay+ewc")
    one = execute(load_config(tiny_config("one", **overrides("lora+replay+ewc", None))), quiet=True)
    script = tmp_path / "dying.py"
    script.write_text(KILL)
    killed = torchrun("run", str(tiny_config("two", **over)), "--quiet", script=script, check=False)
    assert killed.returncode != 0
    run_dir = tmp_path / "runs" / "two"
    assert not (run_dir / "results.json").exists()
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    # Phase 2's first step was checkpointed (gathered weights and optimizer moments).
    assert state["completed_phases"] == 1 and state["progress"]["phase"] == 1
    alone = tmp_path / "runs" / "alone"
    shutil.copytree(run_dir, alone)
    torchrun("run", "--resume", str(run_dir), "--quiet")
    assert_same_run(one, json.loads((run_dir / "results.json").read_text()), tmp_path / "runs" / "one", run_dir)
    # The checkpoint holds whole tensors: one process without sharding resumes it too.
    config = yaml.safe_load((alone / "config.yaml").read_text())
    config["train"]["sharding"] = "none"
    (alone / "config.yaml").write_text(yaml.safe_dump(config))
    resumed = execute(load_run_config(alone), run_dir=alone, resume=True, quiet=True)
    assert resumed["num_processes"] == 1
    assert_same_run(one, resumed, tmp_path / "runs" / "one", alone)


@pytest.mark.parametrize("strategy, why", [("lwf", "snapshots the whole model as a teacher"),
                                           ("lora-per-task", "adds a new adapter at each task's start"),
                                           ("l2p", "prompt pool wraps the model")])
def test_a_strategy_that_cannot_run_sharded_is_refused(tiny_config, monkeypatch, strategy, why):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(tiny_config(strategy=strategy, **small_options(strategy), train__sharding="zero3"))
    if strategy == "l2p":  # refused for data-parallel runs already, with its own reason
        with pytest.raises(RetainError, match="cannot run data-parallel"):
            check_run(cfg)
        return
    with pytest.raises(RetainError, match=f"train.sharding: zero3: strategy '{strategy}' cannot run sharded: .*{why}.*"
                                          "Strategies that can: ewc, joint, lora, mix, naive, replay, rewarm"):
        check_run(cfg)


@pytest.mark.parametrize("over, match", [
    ({"model_quantization": "nf4", "strategy": "lora"}, None),
    ({"analysis": {"enabled": True}}, "analysis.enabled is not available in a sharded run"),
])
def test_a_setting_a_sharded_run_cannot_honour_is_refused(tiny_config, monkeypatch, over, match):
    from retain.models import quantization

    monkeypatch.setenv("WORLD_SIZE", "2")
    # Without a GPU quantization is refused on its own; the refusal checked here is sharding's.
    monkeypatch.setattr(quantization, "check", lambda config, stack: None)
    with pytest.raises(RetainError, match=match or "model_quantization is not available in a sharded run"):
        check_run(load_config(tiny_config(**over, train__sharding="zero2")))


@pytest.mark.parametrize("env, mode", [({"FSDP_SHARDING_STRATEGY": "FULL_SHARD"}, "zero3"),
                                       ({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "zero2"),
                                       ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
                                         "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}, "zero2"),
                                       ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}, "zero3"),
                                       ({}, "zero3")])
def test_an_accelerate_fsdp_launch_asks_for_sharding(tiny_config, monkeypatch, env, mode):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key in ("FSDP_VERSION", "FSDP_SHARDING_STRATEGY", "FSDP_RESHARD_AFTER_FORWARD"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert sharding.requested(load_config(tiny_config())) == mode
    other = "zero2" if mode == "zero3" else "zero3"
    with pytest.raises(RetainError, match=f"train.sharding: {other} contradicts the accelerate FSDP config"):
        sharding.requested(load_config(tiny_config(train__sharding=other)))
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(RetainError, match="FSDP_SHARDING_STRATEGY=HYBRID_SHARD"):
        sharding.requested(load_config(tiny_config()))


def test_a_deepspeed_launch_is_refused_with_the_sharding_that_replaces_it(tiny_config, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RetainError, match="DeepSpeed's engine .* set train.sharding: zero2 or zero3"):
        check_run(load_config(tiny_config()))


def test_every_strategy_is_reviewed_for_sharded_runs():
    from retain.strategies import registry

    unreviewed = sorted(n for n, c in registry().items() if c.sharded is None)
    assert not unreviewed, f"declare sharded ('' or the reason) for: {unreviewed}"
    works = sorted(n for n, c in registry().items() if c.sharded == "")
    assert works == sorted({part for s in SHARDED for part in s.split("+")}), "test every sharded strategy here"
