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
