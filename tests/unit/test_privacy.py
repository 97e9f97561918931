"""DP-SGD through Opacus (``privacy:``) and the membership-inference check (``eval.membership``)."""

from __future__ import annotations

import contextlib
import json
import random

import pytest
import torch
import yaml

from retain.config import load_config
from retain.errors import RetainError
from retain.loop import execute

pytest.importorskip("opacus", reason="privacy is an extra: pip install 'retain[privacy]'")


def private_config(tiny_config, name: str = "dp", **over):
    """Two tasks (16 and 10 training examples), DP-SGD with a delta below 1/N."""
    base = dict(privacy={"noise_multiplier": 1.0, "delta": 1e-3, "accountant": "rdp"},
                train__max_steps=4, eval={"probe": False, "max_new_tokens": 4})
    return load_config(tiny_config(name, **{**base, **over}))


def accountant_epsilon(history, delta, kind="rdp"):
    from opacus.accountants import create_accountant

    acc = create_accountant(kind)
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def test_each_example_gradient_is_clipped_to_the_configured_norm():
    """Against per-example gradients taken one example at a time: DP-SGD's update is the sum
    of each clipped to max_grad_norm, over the expected batch size (noise made negligible)."""
    from peft import LoraConfig, get_peft_model

    from retain.batching import collate
    from retain.config import PrivacyConfig, RunConfig
    from retain.models import load_model
    from retain.privacy import PhasePlan, PrivateTraining, per_example_loss
    from retain.streams.task import Item

    model, tok = load_model("tiny-random", seed=0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(model, lora).double()
    params = [p for p in model.parameters() if p.requires_grad]
    items = [Item("t", f"question {i}", f" answer number {i * 7}") for i in range(3)]
    batch = collate(tok, items, 64)
    clip = 1e-3
    expected = [torch.zeros_like(p) for p in params]
    for i in range(len(items)):
        model.zero_grad()
        row = {k: v[i:i + 1] for k, v in batch.items()}
        per_example_loss(model(input_ids=row["input_ids"], attention_mask=row["attention_mask"]).logits,
                         row["labels"]).sum().backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
        assert norm > 10 * clip  # so that clipping acts
        for e, p in zip(expected, params):
            e += p.grad * (clip / (norm + 1e-6))  # Opacus's clip factor (its 1e-6 guards a zero norm)
    model.zero_grad()
    before = [p.detach().clone() for p in params]
    config = RunConfig.model_validate({"name": "x", "stream": "numbers", "train": {"batch_size": 3},
                                       "privacy": {"noise_multiplier": 1e-9, "max_grad_norm": clip}})
    assert isinstance(config.privacy, PrivacyConfig)
    dp = PrivateTraining(config)
    optimizer = dp.begin(model, torch.optim.SGD(params, lr=1.0), PhasePlan(1e-9, 1.0, 1, 3))
    dp.step(batch, params, optimizer, contextlib.nullcontext)
    dp.end()
    for b, p, e in zip(before, params, expected):
        # atol covers the residual noise (std 1e-12 per coordinate) and summation order; one CI
        # run saw 1.6e-11. The clipped updates themselves are ~1e-6 and above.
        torch.testing.assert_close(b - p.detach(), e / 3, rtol=1e-6, atol=1e-10)


def test_reported_epsilon_is_opacus_accountant_for_the_same_steps(tiny_config):
    results = execute(private_config(tiny_config), quiet=True)
    p = results["privacy"]
    assert [ph["examples"] for ph in p["phases"]] == [16, 10] and [ph["steps"] for ph in p["phases"]] == [4, 4]
    for ph in p["phases"]:
        assert ph["sample_rate"] == pytest.approx(4 / ph["examples"])
        assert ph["epsilon"] == pytest.approx(accountant_epsilon([(1.0, ph["sample_rate"], 4)], 1e-3), abs=1e-4)
    # No memory: each task's examples are trained in one phase, so the stream's epsilon is the largest phase's.
    assert p["task_epsilon"] == {"upper": p["phases"][0]["epsilon"], "small": p["phases"][1]["epsilon"]}
    assert results["metrics"]["epsilon"] == p["epsilon"] == max(p["task_epsilon"].values())
    assert "note" not in p


def test_a_target_epsilon_sets_each_phase_noise_to_spend_it(tiny_config, tmp_path):
    results = execute(private_config(tiny_config, privacy={"epsilon": 3.0, "delta": 1e-3}), quiet=True)
    for ph in results["privacy"]["phases"]:
        assert ph["epsilon"] == pytest.approx(3.0, abs=0.05)
        assert ph["noise_multiplier"] > 0
    report = (tmp_path / "runs" / "dp" / "report.md").read_text()
    assert "## Privacy (DP-SGD)" in report and "target epsilon 3.00 per phase" in report


def test_replayed_examples_spend_budget_again(tiny_config):
    """A memory replayed in phase two is a second subsampled Gaussian on task one's examples."""
    results = execute(private_config(tiny_config, strategy="lora+replay", replay={"buffer_size": 6, "ratio": 0.5}),
                      quiet=True)
    p = results["privacy"]
    first, second = p["phases"]
    assert first["memory_sample_rate"] == 0
    # Four expected draws a step (ratio 0.5 of what trains, batch 4) from a memory of six.
    assert second["memory_sample_rate"] == pytest.approx(4 / 6)
    both = accountant_epsilon([(1.0, first["sample_rate"], 4), (1.0, second["memory_sample_rate"], 4)], 1e-3)
    assert p["task_epsilon"]["upper"] == pytest.approx(both, abs=1e-4) and both > first["epsilon"]
    assert p["task_epsilon"]["small"] == second["epsilon"]
    assert "upper in 1 later phase" in p["note"]
    # Each private example entered memory once.
    memory = results["strategy_stats"][0]["replay"]["memory_examples"]
    assert memory <= 6


def test_poisson_batches_vary_in_size_and_repeat_with_the_seed():
    from itertools import islice

    from retain.privacy import poisson_batches
    from retain.streams.task import Item

    items = [Item("t", str(i), "x") for i in range(50)]
    a = [len(b) for b in islice(poisson_batches(items, 0.1, 40, seed=3), 40)]
    b = [len(b) for b in islice(poisson_batches(items, 0.1, 40, seed=3), 40)]
    assert a == b and len(set(a)) > 2 and 2 < sum(a) / len(a) < 8


def test_an_empty_poisson_batch_is_a_noise_only_step(tiny_config, monkeypatch):
    import retain.loop as loop

    real = loop.poisson_batches

    def some_empty(items, rate, steps, seed):
        for i, batch in enumerate(real(items, rate, steps, seed)):
            yield [] if i % 2 == 0 else batch
    monkeypatch.setattr(loop, "poisson_batches", some_empty)
    results = execute(private_config(tiny_config, strategy="lora"), quiet=True)
    assert [t["steps"] for t in results["timings"]] == [4, 4]
    assert all(t["tokens"] > 0 for t in results["timings"])


@pytest.mark.parametrize("strategy,fragment", [
    ("ewc", "its Fisher information is estimated from private examples"),
    ("lwf", "its distillation term"),
    ("lora-per-task", "its task router keeps the mean embedding of each task's private inputs"),
    ("es", "it replaces the gradient step with evolution strategies"),
])
def test_methods_dp_sgd_does_not_cover_are_refused_with_the_reason(tiny_config, strategy, fragment):
    from retain.loop import check_run

    with pytest.raises(RetainError, match=f"privacy: strategy '{strategy}' cannot train privately: {fragment}") as err:
        check_run(private_config(tiny_config, strategy=strategy))
    assert "covered: " in str(err.value) and "lora" in str(err.value).split("covered: ")[1]


@pytest.mark.parametrize("over,fragment", [
    (dict(strategy="lora+replay", replay={"policy": "coreset", "buffer_size": 6}), "policy reservoir"),
    (dict(online={}), "online mode"),
    (dict(train__precision="fp16"), "fp16"),
    (dict(privacy={"epsilon": 1.0, "delta": 0.07}), r"privacy.delta 0.07 is not below 1/N = 1/16 for task 'upper'"),
])
def test_settings_the_accountant_cannot_cover_are_refused(tiny_config, over, fragment):
    from retain.loop import check_run

    with pytest.raises(RetainError, match=fragment):
        check_run(private_config(tiny_config, **over))


def test_privacy_needs_exactly_one_of_epsilon_and_noise(tiny_config, tmp_path):
    path = tiny_config("both", privacy={"epsilon": 1.0, "noise_multiplier": 1.0})
    with pytest.raises(RetainError, match="privacy.*exactly one of epsilon"):
        load_config(path)
    assert not (tmp_path / "runs" / "both").exists()


def test_private_run_killed_inside_a_task_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    import retain.loop as loop
    from tests.conftest import run_figures

    over = dict(strategy="lora+replay", replay={"buffer_size": 6, "ratio": 0.5}, train__checkpoint_every=2)
    full = execute(private_config(tiny_config, "full", **over), quiet=True)
    real, calls = loop.Run.private_step, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # inside task two, after its step-2 checkpoint
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(loop.Run, "private_step", dying)
    with pytest.raises(KeyboardInterrupt):
        execute(private_config(tiny_config, "killed", **over), quiet=True)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "killed"
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["progress"]["phase"] == 1 and len(state["progress"]["losses"]) == 2
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    assert run_figures(resumed) == run_figures(full)
    assert resumed["privacy"] == full["privacy"]


def test_membership_auc_matches_hand_computed_values():
    from retain.evaluation.membership import auc

    assert auc([1, 2], [3, 4]) == 1.0  # every member has the lower loss
    assert auc([3, 4], [1, 2]) == 0.0
    assert auc([1.0], [1.0]) == 0.5  # a tie counts one half
    assert auc([1, 3], [2, 4]) == 0.75  # 1<2, 1<4, 3<4 of four pairs
    assert auc([1, 2, 2], [2, 5]) == pytest.approx((1 + 1 + 0.5 + 1 + 0.5 + 1) / 6)  # two ties with the 2
    rng = random.Random(0)
    xs, ys = [rng.random() for _ in range(30)], [rng.random() for _ in range(20)]
    brute = sum((x < y) + 0.5 * (x == y) for x in xs for y in ys) / (30 * 20)
    assert auc(xs, ys) == pytest.approx(brute)


def test_membership_check_scores_members_and_held_out_examples(tiny_config, tmp_path):
    """Without DP, many steps on a few random strings: the final model tells its training
    strings from held-out ones (the base model cannot)."""
    rng = random.Random(0)
    word = lambda: "".join(rng.choice("abcdefghijklmnop") for _ in range(6))  # noqa: E731
    files = {}
    for split, n in (("train", 8), ("test", 8)):
        files[split] = tmp_path / f"codes_{split}.jsonl"
        files[split].write_text("\n".join(json.dumps({"input": f"code {word()}", "output": word()})
                                          for _ in range(n)))
    task = {"name": "codes", "train": str(files["train"]), "test": str(files["test"])}
    results = execute(load_config(tiny_config("mia", tasks=[task], train__max_steps=60, train__lr=1e-2,
                                              eval={"probe": False, "membership": 6, "max_new_tokens": 4})),
                      quiet=True)
    m = results["membership"]
    assert set(m) == {"base", "final"}
    for when in ("base", "final"):
        assert set(m[when]["tasks"]) == {"codes"} and m[when]["tasks"]["codes"]["n"] == 6
        assert m[when]["auc"] == m[when]["tasks"]["codes"]["auc"]
    final = m["final"]["tasks"]["codes"]
    assert final["member_loss"] < final["nonmember_loss"] and final["auc"] > 0.9 > m["base"]["auc"]
    assert results["metrics"]["membership_auc"] == final["auc"]
    assert "## Membership inference" in (tmp_path / "runs" / "mia" / "report.md").read_text()
    saved = yaml.safe_load((tmp_path / "runs" / "mia" / "config.yaml").read_text())
    assert saved["eval"]["membership"] == 6


def test_every_strategy_says_whether_dp_sgd_covers_it():
    """A new method must be reviewed for privacy: None (unreviewed) is refused at run time."""
    from retain.strategies import registry

    unreviewed = sorted(n for n, c in registry().items() if c.not_private is None)
    assert unreviewed == []
