"""A run killed anywhere (between tasks, inside one, while a checkpoint is written, by a real
SIGKILL, by a loss gone NaN) resumes from its last checkpoint and ends with the same figures."""

import json

import pytest

import retain.checkpoint as checkpoint
import retain.loop as loop
from retain.config import load_config
from retain.loop import execute


class Killed(Exception):
    pass


@pytest.mark.parametrize("strategy", ["naive", "lora-per-task+replay", "lora+replay", "ewc", "distill-replay", "lora+lwf"])
def test_resume_equals_uninterrupted(tiny_config, tmp_path, monkeypatch, strategy):
    tasks_cfg = dict(strategy=strategy, train__max_steps=4, replay={"buffer_size": 6, "ratio": 0.5},
                     ewc={"fisher_samples": 3}, **{"distill-replay": {"buffer_size": 5, "ratio": 0.5, "top_k": 3}})
    full = execute(load_config(tiny_config("full", **tasks_cfg)), quiet=True)

    cfg = load_config(tiny_config("killed", **tasks_cfg))
    real = loop.Run.train_phase

    def die_in_second_phase(self, ctx, stack, tasks, phase):
        if phase == 1:
            raise Killed()
        return real(self, ctx, stack, tasks, phase)

    monkeypatch.setattr(loop.Run, "train_phase", die_in_second_phase)
    with pytest.raises(Killed):
        execute(cfg, quiet=True)
    run_dir = tmp_path / "runs" / "killed"
    assert not (run_dir / "results.json").exists()
    assert json.loads((run_dir / "checkpoints" / "state.json").read_text())["completed_phases"] == 1

    monkeypatch.setattr(loop.Run, "train_phase", real)
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    assert resumed["R"] == full["R"]
    assert resumed["base"] == full["base"]
    assert resumed["metrics"] == full["metrics"]
    assert resumed["probe"]["after_phase"] == full["probe"]["after_phase"]


@pytest.mark.parametrize("strategy", ["es", "lora+es"])
def test_es_killed_inside_a_phase_resumes_at_its_last_checkpoint(tiny_config, tmp_path, monkeypatch, strategy):
    from retain.strategies.es import ES

    es = {"population": 4, "sigma": 0.05 if strategy == "es" else 2.0, "alpha": 0.05, "max_new_tokens": 3}
    analysis = {"enabled": True, "every": 1, "kl_prompts": 2}
    over = dict(strategy=strategy, es=es, analysis=analysis, train__max_steps=5, train__checkpoint_every=2)
    full = execute(load_config(tiny_config("full", **over)), quiet=True)

    real, calls = ES.step, []

    def die_at_fourth_step_of_second_phase(self, ctx, items):
        calls.append(ctx.phase)
        if calls.count(1) == 4:
            raise Killed()
        return real(self, ctx, items)

    monkeypatch.setattr(ES, "step", die_at_fourth_step_of_second_phase)
    with pytest.raises(Killed):
        execute(load_config(tiny_config("killed", **over)), quiet=True)
    run_dir = tmp_path / "runs" / "killed"
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["completed_phases"] == 1 and len(state["progress"]["losses"]) == 2  # the step-2 checkpoint
    # The killed process's time up to its checkpoint stays in the run's wall time.
    assert state["wall_s"] > state["progress"]["seconds"] + sum(t["train_s"] for t in state["timings"])

    calls.clear()
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    assert calls == [1, 1, 1]  # steps 3, 4, 5 of the second phase, nothing before
    assert resumed["R"] == full["R"] and resumed["probe"]["after_phase"] == full["probe"]["after_phase"]
    strip = lambda u: {k: v for k, v in u.items() if k != "seconds"}  # noqa: E731
    assert [strip(u) for u in resumed["updates"]] == [strip(u) for u in full["updates"]]
    drop_time = lambda s: {k: v for k, v in s["es"].items() if k != "seconds_per_iteration"}  # noqa: E731
    assert [drop_time(s) for s in resumed["strategy_stats"]] == [drop_time(s) for s in full["strategy_stats"]]
    assert [t["loss_last"] for t in resumed["timings"]] == [t["loss_last"] for t in full["timings"]]
    assert json.loads((run_dir / "checkpoints" / "state.json").read_text())["progress"] is None
    assert resumed["wall_s"] > max(state["wall_s"], resumed["train_s"])


def test_every_strategy_but_grpo_resumes_inside_a_phase():
    from retain.strategies import StrategyStack
    from retain.strategies.base import parse_strategy

    stack = lambda spec: StrategyStack([c() for c in parse_strategy(spec)])  # noqa: E731
    for spec in ("naive", "lora", "es", "lora+es", "es+replay", "ewc", "lora+replay+ewc"):
        assert stack(spec).resumes_mid_phase, spec
    # TRL's trainer runs the phase outside the loop.
    assert not stack("grpo").resumes_mid_phase


GRADIENT = dict(train__max_steps=4, train__checkpoint_every=2, replay={"buffer_size": 6, "ratio": 0.5},
                ewc={"fisher_samples": 3}, analysis={"enabled": True, "every": 1, "kl_prompts": 2})


def _killed_at(monkeypatch, target, attr: str, call: int):
    """Make ``target.attr`` raise Killed on its ``call``-th call; returns the undo."""
    real, calls = getattr(target, attr), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Killed()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, dying)


@pytest.mark.parametrize("strategy", ["naive", "lora+replay+ewc"])
@pytest.mark.parametrize("call", [1, 3, 7], ids=["first-step", "after-in-task-checkpoint", "inside-task-two"])
def test_gradient_run_killed_inside_a_task_resumes_exactly(tiny_config, tmp_path, monkeypatch, strategy, call):
    from tests.conftest import run_figures

    full = execute(load_config(tiny_config("full", strategy=strategy, **GRADIENT)), quiet=True)
    _killed_at(monkeypatch, loop.Run, "gradient_step", call)
    with pytest.raises(Killed):
        execute(load_config(tiny_config("killed", strategy=strategy, **GRADIENT)), quiet=True)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "killed"
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    # Steps 1-2 of task one make the step-2 checkpoint, steps 5-6 (task two) its step-2 one.
    expected = {1: None, 3: (0, 2), 7: (1, 2)}[call]
    got = (state["progress"]["phase"], len(state["progress"]["losses"])) if state["progress"] else None
    assert got == expected
    if state["progress"]:
        from safetensors import safe_open

        with safe_open(str(run_dir / "checkpoints" / state["progress"]["tensors"]), "pt") as f:
            keys = list(f.keys())
        # For LoRA the in-task checkpoint is the adapter (and its optimizer state), not the base model.
        assert keys and all(("lora_" in k) == strategy.startswith("lora") for k in keys)
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    assert run_figures(resumed) == run_figures(full)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(
        ["state.json", *json.loads((run_dir / "checkpoints" / "state.json").read_text())["files"].values()])


def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one(tiny_config, tmp_path, monkeypatch):
    from tests.conftest import run_figures

    over = dict(strategy="lora+replay", **GRADIENT)
    full = execute(load_config(tiny_config("full", **over)), quiet=True)
    # The third checkpoint write of state.json (after base, in-task step 2: the one that ends
    # task one) dies after its tensors are on disk.
    _killed_at(monkeypatch, checkpoint, "atomic_write_json", 3)
    with pytest.raises(Killed):
        execute(load_config(tiny_config("killed", **over)), quiet=True)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "killed"
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["completed_phases"] == 0 and len(state["progress"]["losses"]) == 2
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    assert run_figures(resumed) == run_figures(full)


def test_kill_9_of_a_real_process_resumes_to_the_same_figures(tiny_config, tmp_path):
    """A real SIGKILL at whatever moment the process is in once it has checkpointed inside a task."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import run_figures

    over = dict(strategy="lora+replay", train__max_steps=40, train__checkpoint_every=3,
                replay={"buffer_size": 6, "ratio": 0.5})
    full = execute(load_config(tiny_config("full", **over)), quiet=True)
    cfg = tiny_config("killed", **over)
    run_dir = tmp_path / "runs" / "killed"
    state_file = run_dir / "checkpoints" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "retain.cli", "run", str(cfg), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(state_file.read_text()).get("progress"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.3)  # somewhere in the next steps, a checkpoint write perhaps
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "results.json").exists()
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    assert run_figures(resumed) == run_figures(full)


def test_a_loss_that_becomes_nan_stops_the_run_resumably(tiny_config, tmp_path, monkeypatch):
    from retain.errors import RetainError
    from tests.conftest import run_figures

    over = dict(strategy="naive", **{k: v for k, v in GRADIENT.items() if k.startswith("train")})
    full = execute(load_config(tiny_config("full", **over)), quiet=True)
    real, calls = loop.Run.gradient_step, []

    def nan_at_sixth(self, *args):
        calls.append(1)
        loss, tokens = real(self, *args)
        return (float("nan"), tokens) if len(calls) == 6 else (loss, tokens)

    monkeypatch.setattr(loop.Run, "gradient_step", nan_at_sixth)
    with pytest.raises(RetainError, match=r"phase 2 \(small\): the loss became nan at step 2; .*phase 2 at its start"):
        execute(load_config(tiny_config("nan", **over)), quiet=True)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "nan"
    assert not (run_dir / "results.json").exists()
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    assert run_figures(resumed) == run_figures(full)
