"""A run killed after a task resumes from its checkpoint and ends with the same figures."""

import json

import pytest

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
    assert "progress" not in json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert resumed["wall_s"] > max(state["wall_s"], resumed["train_s"])


def test_only_stateless_step_strategies_checkpoint_inside_a_phase():
    from retain.strategies import StrategyStack
    from retain.strategies.base import parse_strategy

    stack = lambda spec: StrategyStack([c() for c in parse_strategy(spec)])  # noqa: E731
    assert stack("es").checkpoints_in_phase and stack("lora+es").checkpoints_in_phase
    # An optimizer's moments (gradient steps) or replay's draws are not in a checkpoint.
    assert not stack("naive").checkpoints_in_phase and not stack("lora").checkpoints_in_phase
    assert not stack("es+replay").checkpoints_in_phase and not stack("ewc").checkpoints_in_phase
