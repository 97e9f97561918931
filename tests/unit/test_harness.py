"""lm-evaluation-harness on the live model: the same items give the same accuracies."""

import pytest

from retain.config import load_config
from retain.errors import RetainError
from retain.loop import check_run, execute


def test_harness_scores_the_same_items_as_retain_after_every_phase(tiny_config):
    cfg = tiny_config("h", strategy="lora", eval__probe=["facts", "piqa"],
                      eval__harness={"tasks": ["retain_small", "retain_facts", "retain_piqa"]})
    results = execute(load_config(cfg), quiet=True)
    assert len(results["evaluations"]) == 3  # base, after each task
    for evaluation in results["evaluations"]:
        ours, theirs = evaluation["scores"], evaluation["harness"]
        for task, name in (("small", "retain_small"), ("facts", "retain_facts"), ("piqa", "retain_piqa")):
            assert theirs[name]["acc"] == pytest.approx(ours[task]["acc"], abs=1e-6)
            assert theirs[name]["acc_norm"] == pytest.approx(ours[task]["acc_norm"], abs=1e-6)
            # R's standard error is that of the task's own scoring: acc_norm for PIQA, acc for the others.
            stderr = "acc_norm_stderr" if task == "piqa" else "acc_stderr"
            assert theirs[name][stderr] == pytest.approx(ours[task]["stderr"], abs=1e-6)


@pytest.mark.parametrize("over, fragment", [
    ({"eval__probe": "facts", "eval__harness": {"tasks": ["retain_nope"]}},
     "'retain_nope' names no choice task of this run; valid: retain_small, retain_facts"),
    ({"eval__harness": {"tasks": ["retain_upper"]}}, "'retain_upper' names no choice task"),
    ({"strategy": "l2p", "eval__harness": {"tasks": ["retain_small"]}}, "l2p rewrites the model's input"),
])
def test_harness_settings_are_checked_before_the_model_loads(tiny_config, over, fragment):
    with pytest.raises(RetainError, match=fragment):
        check_run(load_config(tiny_config("h", **over)))
