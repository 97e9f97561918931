"""The contract every registered strategy keeps, alone and with every method it may join.

The table is the registry itself (``combinations()``): a new strategy gets this coverage
by existing. For each stack, on tiny-random: its default options validate; two phases
run; every hook its strategies override is called (spied); every ``state_dict`` survives
JSON; and a run killed inside the second phase (at phase start where the phase runs
outside the loop) resumes to the same figures as an uninterrupted one.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

import retain.checkpoint as checkpoint
import retain.loop as loop
from retain.config import load_config
from retain.loop import check_run, execute
from retain.strategies.base import HOOKS, combinations, parse_strategy
from tests.conftest import run_figures, small_options

#: Called only by a resumed run.
RESUME_HOOKS = {"load_state_dict", "load_state_tensors", "load_phase_state"}
#: Called only under ``privacy:`` (tests/unit/test_privacy.py runs them).
PRIVATE_HOOKS = {"private_replay_rate"}


class Killed(Exception):
    pass


def _spy(monkeypatch, classes) -> tuple[Counter, list]:
    calls: Counter = Counter()
    states: list = []
    for cls in classes:
        for hook in cls.overridden():
            real = getattr(cls, hook)

            def spy(self, *args, __real=real, __key=(cls.name, hook), **kwargs):
                calls[__key] += 1
                out = __real(self, *args, **kwargs)
                if __key[1] in ("state_dict", "phase_state"):
                    states.append((__key, out))
                return out

            monkeypatch.setattr(cls, hook, spy)
    return calls, states


@pytest.mark.parametrize("spec", combinations())
def test_strategy_contract(spec, tiny_config, tmp_path, monkeypatch):
    classes = parse_strategy(spec)
    # Default options validate, with every check that needs only the config and the data.
    stream, stack = check_run(load_config(tiny_config("defaults", strategy=spec)))
    last = len(stack.plan(stream.tasks)) - 1  # joint trains one phase

    over = dict(strategy=spec, train__max_steps=3, train__checkpoint_every=1, eval__max_new_tokens=2,
                eval__probe_max=4, **small_options(spec))
    calls, states = _spy(monkeypatch, classes)
    full = execute(load_config(tiny_config("full", **over)), quiet=True)
    for cls in classes:
        for hook in cls.overridden() - RESUME_HOOKS - PRIVATE_HOOKS:
            assert calls[(cls.name, hook)] > 0, f"{spec}: {cls.name}.{hook} was never called"
    for key, state in states:
        # A phase state's tensors are saved beside the JSON (checkpoint.split_tensors).
        plain = checkpoint.split_tensors(state, {}) if key[1] == "phase_state" else state
        assert json.loads(json.dumps(plain)) == plain, f"{spec}: {key} does not survive JSON"

    # Killed inside the last phase (or at its start when the loop does not run it).
    if all(c.resumes_mid_phase for c in classes):
        real_save, saves = checkpoint.save_progress, []

        def die_at_second_step_of_last_phase(run_dir, state, progress, *args, **kwargs):
            saves.append(progress.phase)
            if saves.count(last) == 2:
                raise Killed()
            return real_save(run_dir, state, progress, *args, **kwargs)

        monkeypatch.setattr(checkpoint, "save_progress", die_at_second_step_of_last_phase)
    else:
        real_phase = loop.Run.train_phase

        def die_at_last_phase(self, ctx, stack, tasks, phase):
            if phase == last:
                raise Killed()
            return real_phase(self, ctx, stack, tasks, phase)

        monkeypatch.setattr(loop.Run, "train_phase", die_at_last_phase)
    with pytest.raises(Killed):
        execute(load_config(tiny_config("killed", **over)), quiet=True)
    monkeypatch.undo()

    run_dir = tmp_path / "runs" / "killed"
    assert not (run_dir / "results.json").exists()
    classes = parse_strategy(spec)
    calls, _ = _spy(monkeypatch, classes)
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    got, want = run_figures(resumed), run_figures(full)
    for key in want:
        assert got[key] == want[key], f"{spec}: {key} differs after resuming: {got[key]} != {want[key]}"
    for cls in classes:
        if "load_state_dict" in cls.overridden():
            assert calls[(cls.name, "load_state_dict")] > 0, f"{spec}: {cls.name}.load_state_dict never called"


def test_the_table_covers_every_registered_strategy():
    from retain.strategies import registry

    covered = {name for spec in combinations() for name in spec.split("+")}
    assert covered == set(registry())


def test_hooks_list_every_hook_of_the_base_class():
    from retain.strategies.base import Strategy

    public = {n for n, v in vars(Strategy).items() if callable(v) and not n.startswith("_")
              and n not in ("overridden", "takes_over")}
    assert public == set(HOOKS)
