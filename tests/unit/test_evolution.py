"""ES mechanics on a tiny model: exact restore, the update formula, per-tensor noise, ties."""

import pytest
import torch

from retain.strategies.es.noise import (CHUNK, Perturbation, apply_update, full_noise, noise_seed, perturbed_members,
                              unique_parameters, zscore)
from retain.models import load_model
from retain.rewards import answer_reward as reward
from retain.strategies.es import ESOptions


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny-random", seed=0)
    return model, unique_parameters(list(model.named_parameters()))


def snapshot(params):
    return {n: p.detach().clone() for n, p in params}


@pytest.mark.parametrize("scale", [1e-3, 0.3, -0.05])
def test_perturb_then_restore_is_bit_identical(tiny, scale):
    _, params = tiny
    before = snapshot(params)
    with Perturbation(params, seed=7, scale=scale):
        moved = sum(int((p != before[n]).sum()) for n, p in params)
    assert moved > 0.9 * sum(p.numel() for _, p in params)
    for n, p in params:
        assert torch.equal(p, before[n]), n


def test_moving_member_to_member_holds_each_perturbation_and_restores_exactly(tiny):
    _, params = tiny
    before = snapshot(params)
    members = [(3, 1), (3, -1), (8, 1), (21, -1)]
    seen = 0
    for (seed, sign), pert in zip(members, perturbed_members(params, members, 0.2)):
        for i, (n, p) in enumerate(params):
            assert torch.allclose(p - before[n], sign * 0.2 * full_noise(seed, i, p), atol=1e-5), (seed, n)
        seen += 1
    assert seen == len(members)
    assert all(torch.equal(p, before[n]) for n, p in params)
    for _ in perturbed_members(params, members, 0.2):
        break  # stopping early (or an error in scoring) still restores the weights
    assert all(torch.equal(p, before[n]) for n, p in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_size_changes_no_weight_only_the_grouping(dtype):
    """A GPU checks several chunks (and small tensors) per device sync; the CPU one chunk.
    Every grouping must give each member the same bits and restore exactly."""
    model, _ = load_model("tiny-random", seed=0)
    model.to(dtype)
    big = torch.nn.Parameter((torch.randn(CHUNK + 77) * 0.02).to(dtype))  # two chunks
    params = unique_parameters(list(model.named_parameters())) + [("big", big)]
    before = snapshot(params)
    members = [(3, 1), (3, -1), (99, 1)]
    seen = {}
    for segment in (1, 5000, None, 4 * CHUNK):  # a chunk or small tensor per segment ... all in one
        for (seed, _), pert in zip(members, perturbed_members(params, members, 0.05, segment=segment)):
            bits = [p.detach().clone() for _, p in params]
            ref = seen.setdefault((seed, pert.scale), (bits, pert.fixed_entries))
            assert pert.fixed_entries == ref[1] > 0
            assert all(torch.equal(a, b) for a, b in zip(bits, ref[0])), (segment, seed)
        for n, p in params:
            assert torch.equal(p, before[n]), (segment, n)


def test_noise_is_a_window_of_the_shared_table_and_the_same_on_every_call(tiny):
    from retain.strategies.es.noise import TABLE_SIZE, noise, noise_table

    table = noise_table("cpu")
    assert table.numel() == TABLE_SIZE and abs(float(table.mean())) < 1e-3 and abs(float(table.std()) - 1) < 1e-3
    x = noise(5, 2, 0, 1000, torch.device("cpu"))
    assert torch.equal(x, noise(5, 2, 0, 1000, torch.device("cpu")))
    assert not torch.equal(x, noise(5, 3, 0, 1000, torch.device("cpu")))
    with pytest.raises(ValueError, match="at most"):
        noise(5, 2, 0, CHUNK + 1, torch.device("cpu"))


def test_perturbation_adds_scaled_noise_of_each_tensor(tiny):
    _, params = tiny
    before = snapshot(params)
    with Perturbation(params, seed=3, scale=0.01):
        for i, (n, p) in enumerate(params):
            assert torch.allclose(p - before[n], 0.01 * full_noise(3, i, p), atol=1e-6)


def test_update_equals_the_formula_from_stored_noise(tiny):
    _, params = tiny
    before = snapshot(params)
    members = [(11, 1), (11, -1), (42, 1), (5, 1)]
    rewards = [0.2, 0.9, 0.5, 0.5]
    z = zscore(rewards)
    r = torch.tensor(rewards, dtype=torch.float64)
    assert z == pytest.approx(((r - r.mean()) / r.std(unbiased=False)).tolist())
    alpha = 0.01
    changed = apply_update(params, members, z, alpha)
    assert changed > 0
    for i, (n, p) in enumerate(params):
        expected = before[n].double() + alpha / len(members) * sum(
            zm * sign * full_noise(seed, i, p).double() for (seed, sign), zm in zip(members, z))
        assert torch.allclose(p.double(), expected, atol=1e-6), n
    with torch.no_grad():  # leave the shared model as it was
        for n, p in params:
            p.copy_(before[n])


def test_equal_rewards_leave_the_weights_unchanged(tiny):
    _, params = tiny
    before = snapshot(params)
    assert zscore([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]
    assert apply_update(params, [(1, 1), (2, 1), (3, 1)], zscore([0.5, 0.5, 0.5]), 0.1) == 0
    assert all(torch.equal(p, before[n]) for n, p in params)


def test_same_shaped_tensors_get_different_noise(tiny):
    _, params = tiny
    shapes = {}
    for i, (n, p) in enumerate(params):
        shapes.setdefault(tuple(p.shape), []).append(i)
    i, j = next(v for v in shapes.values() if len(v) > 1)[:2]
    p = params[i][1]
    assert not torch.equal(full_noise(9, i, p), full_noise(9, j, p))
    assert torch.equal(full_noise(9, i, p), full_noise(9, i, p))
    assert len({noise_seed(9, t, c) for t in range(50) for c in range(50)}) == 2500


def test_tied_weights_are_perturbed_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: one storage, two names
    named = [("embed.weight", emb.weight), ("head.weight", head.weight)]
    params = unique_parameters(named)
    assert [n for n, _ in params] == ["embed.weight"]
    before = emb.weight.detach().clone()
    with Perturbation(params, seed=1, scale=0.1):
        assert torch.allclose(emb.weight - before, 0.1 * full_noise(1, 0, emb.weight), atol=1e-6)


def test_large_tensors_are_processed_in_chunks_with_their_own_noise():
    w = torch.nn.Parameter(torch.zeros(CHUNK + 10))
    n = full_noise(4, 0, w)
    assert not torch.equal(n[:10], n[CHUNK:CHUNK + 10])
    with Perturbation([("w", w)], seed=4, scale=1.0):
        assert torch.equal(w.detach(), n)
    assert torch.count_nonzero(w) == 0


def test_sparse_update_keeps_only_the_top_fraction_and_anchor_decay_pulls_back():
    w = torch.nn.Parameter(torch.zeros(1000))
    apply_update([("w", w)], [(1, 1), (2, 1)], [1.0, -1.0], alpha=1.0, top_fraction=0.1)
    assert int((w != 0).sum()) == 100
    full = 0.5 * (full_noise(1, 0, w) - full_noise(2, 0, w))
    kept = w.detach() != 0
    assert torch.allclose(w.detach()[kept], full[kept])
    assert full.abs()[kept].min() >= full.abs()[~kept].max()
    anchor = {"w": torch.zeros(1000)}
    before = w.detach().clone()
    apply_update([("w", w)], [(1, 1), (2, 1)], [0.0, 0.0], alpha=1.0, anchor=anchor, anchor_decay=0.25)
    assert torch.allclose(w.detach(), 0.75 * before)


def test_reward_scores_answer_and_format():
    assert reward(" 42", " 42", 0.1, None) == pytest.approx(1.1)
    assert reward("41", "42", 0.1, None) == pytest.approx(0.1)
    assert reward("forty two", "42", 0.1, None) == 0.0
    assert reward("41\nmore", "42", 0.5, r"\d+") == pytest.approx(0.5)


def test_es_options_refuse_bad_values():
    with pytest.raises(ValueError, match="even population"):
        ESOptions(population=5, antithetic=True)
    with pytest.raises(ValueError, match="regular expression"):
        ESOptions(format_pattern="(")


def test_countdown_reward_checks_numbers_target_and_tags():
    from retain.rewards import countdown_reward

    prompt = "Using the numbers [3, 7, 25], create an equation that equals 46."
    assert countdown_reward("<answer>25 + 7 * 3</answer>", prompt, "46", 0.1) == pytest.approx(1.1)
    assert countdown_reward("(25 - 3) * 7", prompt, "46", 0.1) == 0.0           # 154, untagged
    assert countdown_reward("<answer>25 + 21</answer>", prompt, "46", 0.1) == pytest.approx(0.1)  # wrong numbers
    assert countdown_reward("<answer>__import__('os')</answer>", prompt, "46", 0.1) == pytest.approx(0.1)
    assert countdown_reward("<answer>25 / (7 - 7) + 3</answer>", prompt, "46", 0.0) == 0.0
