"""Contracts of ewc, lwf, sparse, distill-replay, rewarm and mix on tiny models."""

import math

import pytest
import torch

from retain.config import load_config, validate_config
from retain.errors import RetainError
from retain.loop import Run, prepare
from retain.strategies._importance import diagonal_fisher, named_trainable
from retain.strategies.distill_replay import top_k_targets
from retain.strategies.rewarm import rewarm_factor
from retain.strategies.sparse import top_percent_masks
from retain.ui import UI


def _setup(path, tmp_path):
    cfg = load_config(path)
    ctx, stack = prepare(cfg, UI(quiet=True))
    ctx.run_dir = tmp_path / "run"
    return ctx, stack, Run(cfg, ctx.run_dir, UI(quiet=True))


def _strategy(stack, name):
    return next(s for s in stack.strategies if s.name == name)


def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_matches_finite_differences(tiny_config, tmp_path):
    ctx, stack, run = _setup(tiny_config(strategy="ewc", ewc={"lambda": 50.0, "fisher_samples": 4}), tmp_path)
    ctx.phase = 0
    ewc = _strategy(stack, "ewc")
    ewc.after_task(ctx, [ctx.stream.tasks[0]])
    params = named_trainable(ctx.model)
    assert ewc.penalty(params).item() == 0.0
    name = "model.layers.0.mlp.down_proj.weight"
    p = params[name]
    with torch.no_grad():
        p.add_(torch.randn_like(p) * 0.05)
    penalty = ewc.penalty(params)
    grad = torch.autograd.grad(penalty, p)[0]
    fisher, anchor = ewc.terms[0]
    assert torch.allclose(grad, 50.0 * fisher[name] * (p - anchor[name]), rtol=1e-4, atol=1e-9)
    idx, eps = (0, 0), 1e-3
    with torch.no_grad():
        p[idx] += eps
        up = ewc.penalty(params).item()
        p[idx] -= 2 * eps
        down = ewc.penalty(params).item()
        p[idx] += eps
    assert math.isclose((up - down) / (2 * eps), grad[idx].item(), rel_tol=1e-2, abs_tol=1e-8)


def test_online_ewc_keeps_one_running_fisher_equal_to_the_decayed_sum(tiny_config, tmp_path):
    ctx, stack, run = _setup(tiny_config(strategy="ewc", ewc={"online": True, "gamma": 0.5, "fisher_samples": 3}), tmp_path)
    ewc = _strategy(stack, "ewc")
    params = named_trainable(ctx.model)
    expected = None
    for phase, task in enumerate(ctx.stream.tasks):
        ctx.phase = phase
        run.train_phase(ctx, stack, [task], phase)  # calls ewc.after_task
        items = task.items(ctx.tokenizer)
        f = diagonal_fisher(ctx.model, ctx.tokenizer, items, params, 3, ctx.config.train.max_length,
                            seed=ctx.config.seed * 1000 + phase)
        expected = f if expected is None else {k: 0.5 * expected[k] + v for k, v in f.items()}
    assert len(ewc.terms) == 1
    fisher, anchor = ewc.terms[0]
    assert all(torch.allclose(fisher[k], expected[k], rtol=1e-5, atol=1e-12) for k in expected)
    assert all(torch.equal(anchor[k], params[k]) for k in params)


def test_offline_ewc_keeps_one_term_per_task(tiny_config, tmp_path):
    ctx, stack, run = _setup(tiny_config(strategy="lora+ewc", ewc={"fisher_samples": 2}), tmp_path)
    for phase, task in enumerate(ctx.stream.tasks):
        ctx.phase = phase
        run.train_phase(ctx, stack, [task], phase)
    terms = _strategy(stack, "ewc").terms
    assert len(terms) == 2 and all(all("lora_" in k for k in f) for f, _ in terms)


def test_lwf_term_is_zero_when_teacher_equals_student(tiny_config, tmp_path):
    ctx, stack, run = _setup(tiny_config(strategy="lwf"), tmp_path)
    lwf = _strategy(stack, "lwf")
    ctx.phase = 1
    lwf.before_task(ctx, [ctx.stream.tasks[1]])
    from retain.batching import collate

    items = ctx.stream.tasks[1].items(ctx.tokenizer)[:4]
    batch = {k: v.to(ctx.model.device) for k, v in collate(ctx.tokenizer, items, 64).items()}
    outputs = ctx.model(**batch)
    assert lwf.extra_loss(ctx, batch, outputs, items).abs().item() < 1e-6
    with torch.no_grad():  # the student moves: the term becomes positive, the teacher does not move
        for p in lwf.params:
            p.add_(0.05 * torch.randn_like(p))
    snapshot = [s.clone() for s in lwf.snapshot]
    assert lwf.extra_loss(ctx, batch, ctx.model(**batch), items).item() > 1e-4
    assert all(torch.equal(a, b) for a, b in zip(snapshot, lwf.snapshot))


def test_lwf_under_lora_snapshots_only_the_adapter(tiny_config, tmp_path):
    ctx, stack, run = _setup(tiny_config(strategy="lora+lwf"), tmp_path)
    ctx.phase = 1
    lwf = _strategy(stack, "lwf")
    lwf.before_task(ctx, [ctx.stream.tasks[1]])
    held = sum(s.numel() for s in lwf.snapshot)
    assert 0 < held < 0.2 * sum(p.numel() for p in ctx.model.parameters())


def test_sparse_leaves_unselected_entries_bit_equal(tiny_config, tmp_path):
    ctx, stack, run = _setup(tiny_config(strategy="sparse", sparse={"percent": 10}), tmp_path)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    ctx.phase = 0
    run.train_phase(ctx, stack, [ctx.stream.tasks[0]], 0)
    stats = _strategy(stack, "sparse").stats()
    changed = sum(int((p != before[n]).sum()) for n, p in ctx.model.named_parameters())
    total = sum(p.numel() for p in before.values())
    assert 0 < changed <= 0.10 * total + 1
    assert stats["changed_fraction"] == pytest.approx(changed / total)


def test_sparse_with_fisher_importance_and_masks_pick_exactly_k():
    scores = {"a": torch.tensor([1.0, 5.0, 3.0, 3.0]), "b": torch.tensor([[3.0, 0.0], [9.0, 2.0]])}
    masks = top_percent_masks(scores, 50)
    assert sum(int(m.sum()) for m in masks.values()) == 4
    assert masks["b"][1, 0] and masks["a"][1] and not masks["a"][0]


def test_sparse_refuses_weight_decay(tiny_config, tmp_path):
    with pytest.raises(RetainError, match="weight_decay"):
        _setup(tiny_config(strategy="sparse", train__weight_decay=0.1), tmp_path)


def test_rewarm_schedule_has_the_configured_shape_at_every_stage(tiny_config, tmp_path):
    ctx, stack, run = _setup(tiny_config(strategy="rewarm", rewarm={"warmup_fraction": 0.25, "peak_lr": 0.01,
                                                                       "min_lr_ratio": 0.1}, train__max_steps=8), tmp_path)
    seen = []
    original = torch.optim.AdamW.step

    def record(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *a, **k)

    torch.optim.AdamW.step = record
    try:
        for phase, task in enumerate(ctx.stream.tasks):
            ctx.phase = phase
            run.train_phase(ctx, stack, [task], phase)
    finally:
        torch.optim.AdamW.step = original
    expected = [0.01 * rewarm_factor(s, 8, 0.25, 0.1) for s in range(8)]
    assert seen[:8] == pytest.approx(expected) and seen[8:] == pytest.approx(expected)
    assert expected[0] == pytest.approx(0.005) and expected[1] == pytest.approx(0.01)
    assert expected[1] > expected[4] > expected[7] > 0.001


def test_mix_draws_earlier_stages_into_batches(tiny_config, tmp_path):
    ctx, stack, run = _setup(tiny_config(strategy="mix", mix={"ratio": 0.5}), tmp_path)
    mix = _strategy(stack, "mix")
    ctx.phase = 0
    mix.after_task(ctx, [ctx.stream.tasks[0]])
    ctx.phase = 1
    mix.before_task(ctx, [ctx.stream.tasks[1]])
    new = ctx.stream.tasks[1].items(ctx.tokenizer)
    batch = next(iter(mix.batches(ctx, [], iter([new[:4]]))))
    assert sum(i.task == "upper" for i in batch) == 2 and len(batch) == 4


def test_distill_replay_stores_k_logprobs_per_position(tiny_config, tmp_path):
    ctx, stack, run = _setup(tiny_config(strategy="distill-replay", **{"distill-replay": {"top_k": 5, "ratio": 0.5}}),
                             tmp_path)
    dr = _strategy(stack, "distill-replay")
    ctx.phase = 0
    run.train_phase(ctx, stack, [ctx.stream.tasks[0]], 0)
    assert dr.memory.records
    for record in dr.memory.records:
        n_target = len(ctx.tokenizer(record.item.target + ctx.tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        assert record.ids.shape == record.logp.shape == (n_target, 5)
    # The stored values are the model's own top-5 at storing time.
    again = top_k_targets(ctx.model, ctx.tokenizer, [dr.memory.records[0].item], 5, 256)[0]
    assert torch.equal(again[0], dr.memory.records[0].ids) and torch.allclose(again[1], dr.memory.records[0].logp)
    # Replayed items carry no LM loss; the distillation term is finite and positive.
    ctx.phase = 1
    items = ctx.stream.tasks[1].items(ctx.tokenizer)[:4]
    batch_items = next(iter(dr.batches(ctx, [], iter([items]))))
    assert sum(not i.lm_loss for i in batch_items) == 2
    from retain.batching import collate

    batch = {k: v.to(ctx.model.device) for k, v in collate(ctx.tokenizer, batch_items, 256).items()}
    loss = dr.extra_loss(ctx, batch, ctx.model(**batch), batch_items)
    assert torch.isfinite(loss) and loss.item() > 0


@pytest.mark.parametrize(
    "section, fragment",
    [
        ({"ewc": {"lambda": -1}}, "'ewc.lambda'"),
        ({"ewc": {"gamma": 1.5}}, "'ewc.gamma': Input should be less than or equal to 1 (allowed: > 0 and <= 1)"),
        ({"lwf": {"temperature": 0}}, "'lwf.temperature'"),
        ({"replay": {"ratio": 1.0}}, "(allowed: > 0 and < 1)"),
        ({"sparse": {"percent": 150}}, "'sparse.percent'"),
        ({"mix": {"ratio": 0}}, "'mix.ratio'"),
        ({"distill-replay": {"top_k": 0}}, "'distill-replay.top_k'"),
        ({"rewarm": {"warmup_fraction": 1}}, "'rewarm.warmup_fraction'"),
    ],
)
def test_out_of_range_options_are_refused_with_the_range(section, fragment):
    with pytest.raises(RetainError) as info:
        validate_config({"name": "x", "model": "tiny-random", "stream": "numbers", **section})
    assert fragment in str(info.value)


def test_ewc_normalized_fisher_has_mean_one(tiny_config, tmp_path):
    ctx, stack, run = _setup(tiny_config(strategy="ewc", ewc={"normalize": True, "fisher_samples": 3}), tmp_path)
    ctx.phase = 0
    ewc = _strategy(stack, "ewc")
    ewc.after_task(ctx, [ctx.stream.tasks[0]])
    fisher, _ = ewc.terms[0]
    mean = sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    assert mean.item() == pytest.approx(1.0, rel=1e-5)
