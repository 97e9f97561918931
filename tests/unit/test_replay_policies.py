"""Replay selection policies: k-center coreset, surprise (highest loss), budgets in examples or tokens."""

import json

import pytest
import torch
import torch.nn.functional as F

from retain.streams.task import Item
from retain.strategies._selection import highest_first, k_center_greedy, shuffled
from retain.strategies.replay import Replay, ReplayOptions, TaskMemory, rank


def test_k_center_greedy_on_a_hand_made_set():
    # mean (3.33, 1.83): nearest is (1,0); then the farthest from it (0,10); then (10,0);
    # then (0,1), at distance sqrt(2) from (1,0) -- the largest remaining gap.
    points = torch.tensor([[0, 0], [1, 0], [0, 1], [10, 0], [0, 10], [9, 0]], dtype=torch.float)
    assert k_center_greedy(points, 4) == [1, 4, 3, 2]
    three = k_center_greedy(points, 3)
    radius = torch.cdist(points, points[three]).min(1).values.max()
    assert three == [1, 4, 3] and float(radius) == pytest.approx(2 ** 0.5)  # every cluster covered
    assert k_center_greedy(points, 10) == k_center_greedy(points, 6)  # at most n points
    assert k_center_greedy(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), 2) == [0]  # duplicates add nothing
    assert k_center_greedy(points, 0) == []


def test_orderings_are_priorities():
    assert highest_first([0.5, 2.0, 1.0, 2.0]) == [1, 3, 2, 0]
    order = shuffled(100, "s")
    assert sorted(order) == list(range(100)) and order == shuffled(100, "s") and order != shuffled(100, "t")


def test_task_memory_splits_the_budget_and_keeps_prefixes():
    memory = TaskMemory(budget=6)
    a = [Item("a", f"a{i}", "x") for i in range(10)]
    b = [Item("b", f"b{i}", "x") for i in range(2)]
    memory.add_task("a", a)
    assert memory.records == a[:6]
    memory.add_task("b", b)
    assert memory.records == a[:3] + b[:2] and memory.per_task() == {"a": 3, "b": 2}


def test_token_budget_counts_tokens_per_task():
    memory = TaskMemory(budget=20, cost=lambda item: len(item.prompt))
    a = [Item("a", "x" * n, "") for n in (4, 5, 6, 7)]
    memory.add_task("a", a)
    assert memory.records == a[:3]  # 4 + 5 + 6 = 15 <= 20 < 22
    memory.add_task("b", [Item("b", "y" * 11, ""), Item("b", "y", "")])
    assert memory.records == a[:2]  # share 10 each: 4 + 5 fit; b's first (11) does not, so b keeps nothing
    assert sum(memory.cost(r) for r in memory.records) <= 20


def test_replay_options_refuse_two_budgets_and_unknown_policies():
    with pytest.raises(ValueError, match="not both"):
        ReplayOptions(buffer_size=10, budget_tokens=100)
    with pytest.raises(ValueError, match="reservoir.*coreset.*surprise"):
        ReplayOptions(policy="newest")
    assert ReplayOptions(budget_tokens=100).budget_tokens == 100


@pytest.fixture(scope="module")
def tiny():
    from retain.models import load_model

    model, tokenizer = load_model("tiny-random", seed=0)
    return model, tokenizer


class _Ctx:
    def __init__(self, model, tokenizer):
        from types import SimpleNamespace

        self.model, self.tokenizer = model, tokenizer
        self.config = SimpleNamespace(seed=0, eval=SimpleNamespace(batch_size=4), train=SimpleNamespace(max_length=64))


def _nll(model, tokenizer, item):
    p = tokenizer(item.prompt)["input_ids"]
    c = tokenizer(item.target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1]
    return float(F.cross_entropy(logits.float(), torch.tensor(c)))


def test_surprise_keeps_the_highest_loss_examples(tiny):
    model, tokenizer = tiny
    items = [Item("t", f"Q{i}: say", f" {w}") for i, w in enumerate(["cat dog", "zq xv", "the", "1 2 3", "ok", "hmm yes"])]
    kept = rank("surprise", _Ctx(model, tokenizer), items, 3, "s")[:3]
    losses = {it.prompt: _nll(model, tokenizer, it) for it in items}
    expected = sorted(items, key=lambda it: -losses[it.prompt])[:3]
    assert kept == expected


def test_coreset_is_k_center_on_the_model_embeddings_and_a_run_records_the_memory(tiny, tiny_config):
    from retain.embeddings import embed_texts

    model, tokenizer = tiny
    items = [Item("t", f"item {i}", f" {'ab' * i}") for i in range(8)]
    points = embed_texts(model, tokenizer, [it.prompt + it.target for it in items], 4)
    assert points.shape[0] == 8 and torch.allclose(points.norm(dim=1), torch.ones(8))
    assert rank("coreset", _Ctx(model, tokenizer), items, 3, "s") == [items[i] for i in k_center_greedy(points, 3)]


def test_replay_policies_in_a_run_respect_their_budget_and_resume(tiny, tiny_config):
    from retain.config import load_config
    from retain.loop import execute, run_dir_for

    for policy, budget in (("coreset", {"buffer_size": 5}), ("surprise", {"budget_tokens": 60})):
        cfg = load_config(tiny_config(policy, strategy="replay", replay={"policy": policy, "ratio": 0.5, **budget}))
        results = execute(cfg, run_dir=run_dir_for(cfg), quiet=True)
        stats = [phase["replay"] for phase in results["strategy_stats"]]
        assert stats[-1]["memory_policy"] == policy and set(stats[-1]["memory_per_task"]) == {"upper", "small"}
        if policy == "coreset":
            assert [s["memory_examples"] for s in stats] == [5, 2 + 2]  # 5 for one task, then 5 // 2 each
        else:
            assert 0 < stats[-1]["memory_tokens"] <= 60
        copy = Replay(cfg.options("replay"))
        copy.setup(_Ctx(*tiny))  # the same tokenizer as the run's (tiny-random)
        copy.load_state_dict(None, results_state(run_dir_for(cfg)))
        assert copy.memory.ranked.keys() == {"upper", "small"} and copy.stats()["memory_per_task"] == stats[-1]["memory_per_task"]


def results_state(run_dir):
    """The replay state saved with the run's last checkpoint."""
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    return state["strategy"]["replay"]
