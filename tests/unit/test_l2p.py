"""L2P: key-query selection, soft prompts inserted where callers do not see them, isolation."""


import pytest
import torch
import torch.nn.functional as F

from retain.strategies.l2p import L2P, L2POptions, PromptPool


@pytest.fixture()
def pool():
    from retain.models import load_model

    model, tok = load_model("tiny-random", seed=0)
    for p in model.parameters():
        p.requires_grad = False
    return PromptPool(model.eval(), L2POptions(pool_size=6, prompt_length=2, top_n=2), ["a", "b"]), tok


def test_selection_takes_the_top_n_keys_by_cosine(pool):
    pool, _ = pool
    d = pool.keys.shape[1]
    q = F.normalize(torch.randn(1, d), dim=-1)
    with torch.no_grad():
        for name in ("a", "b"):
            pool.key_sets[name].copy_(-q.expand(3, d))
        pool.key_sets["b"][1] = q[0] * 2
        pool.key_sets["a"][2] = q[0] + 0.1 * torch.randn(d)
    assert sorted(pool.select(q)[0].tolist()) == [2, 4]  # pool index 4 is b's second prompt
    pool.training_task = "a"  # while training a, only a's prompts (0..2) compete
    assert 4 not in pool.select(q)[0].tolist() and 2 in pool.select(q)[0].tolist()


def test_prompts_go_before_the_first_real_token_and_logits_keep_the_callers_shape(pool):
    pool, _ = pool
    base = pool.base
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    out = pool(input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (2, 5, base.config.vocab_size)
    chosen = pool.last_selection
    emb = base.get_input_embeddings()
    for row, first in ((0, 2), (1, 0)):
        real = ids[row][mask[row].bool()]
        soft = pool.prompts[chosen[row]].reshape(-1, emb.weight.shape[1])
        embeds = torch.cat([soft, emb(real)]).unsqueeze(0)
        want = base(inputs_embeds=embeds).logits[0, soft.shape[0]:]
        got = out.logits[row, first:first + len(real)]
        assert torch.allclose(got, want, atol=1e-4), row
    gen = pool.generate(input_ids=ids[:1, 2:], attention_mask=mask[:1, 2:], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 3 + 3) and torch.equal(gen[0, :3], ids[0, 2:])


def test_training_a_task_leaves_the_base_and_other_tasks_prompts_bit_equal(pool):
    pool, _ = pool
    strategy = L2P(pool.options)
    strategy.pool = pool
    ctx = type("Ctx", (), {"model": pool, "accelerator": type("A", (), {"unwrap_model": staticmethod(lambda m: m)})()})()
    before = {n: p.detach().clone() for n, p in pool.named_parameters()}
    strategy.before_task(ctx, [type("T", (), {"name": "b"})()])
    params = strategy.trainable_parameters(ctx)
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    ids = torch.tensor([[3, 4, 5, 6]])
    labels = torch.tensor([[-100, -100, 5, 6]])
    for _ in range(3):
        out = pool(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        loss = out.loss + strategy.extra_loss(ctx, None, out, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in pool.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in ("prompt_sets.b", "key_sets.b")), name


def test_l2p_run_scores_every_task_with_a_frozen_base(tiny_config):
    from retain.config import load_config
    from retain.loop import execute, restore, run_dir_for
    from retain.models import load_model

    cfg = load_config(tiny_config("l2p", strategy="l2p", train__max_steps=3,
                                  l2p={"pool_size": 4, "prompt_length": 2, "top_n": 1}))
    results = execute(cfg, quiet=True)
    assert len(results["R"]) == 2 and all(v is not None for v in results["R"][-1])
    assert results["strategy_stats"][0]["l2p"]["prompts_per_task"] == 2
    ctx, _ = restore(run_dir_for(cfg))
    fresh = dict(load_model("tiny-random", seed=cfg.seed)[0].named_parameters())
    for name, p in ctx.model.named_parameters():
        if name.startswith("base."):
            assert torch.equal(p.cpu(), fresh[name[len("base."):]]), name
    with pytest.raises(Exception, match="each task needs at least top_n=3"):
        execute(load_config(tiny_config("l2p-small", strategy="l2p", l2p={"pool_size": 4, "top_n": 3})), quiet=True)


def test_each_task_trains_its_own_prompts_whatever_the_order_of_its_name(tiny_config, monkeypatch):
    """The stream's tasks ('upper', then 'small') are not in alphabetical order, which is the
    order torch.nn.ParameterDict keeps: the pool's rows must still be the training task's."""
    from retain.config import load_config
    from retain.loop import execute
    from retain.strategies import l2p

    snapshots: list[dict[str, torch.Tensor]] = []
    pools: list[PromptPool] = []
    init, after_task = PromptPool.__init__, L2P.after_task

    def record(pool):
        snapshots.append({n: p.detach().clone() for n, p in pool.named_parameters() if "_sets." in n})

    def init_and_record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        pools.append(self)
        record(self)

    def after_task_and_record(self, ctx, tasks):
        after_task(self, ctx, tasks)
        record(pools[0])

    monkeypatch.setattr(l2p.PromptPool, "__init__", init_and_record)
    monkeypatch.setattr(l2p.L2P, "after_task", after_task_and_record)
    cfg = load_config(tiny_config("l2p-order", strategy="l2p", train__max_steps=3,
                                  l2p={"pool_size": 4, "prompt_length": 2, "top_n": 1}))
    execute(cfg, quiet=True)
    pool = pools[0]
    assert list(pool.owner) == ["upper", "small"] and list(pool.prompt_sets) == ["small", "upper"]
    for name in pool.owner:
        assert torch.equal(pool.prompts[pool.owner[name]], pool.prompt_sets[name])
        assert torch.equal(pool.keys[pool.owner[name]], pool.key_sets[name])
    start, after_upper, after_small = snapshots
    for kind in ("prompt_sets", "key_sets"):
        assert not torch.equal(after_upper[f"{kind}.upper"], start[f"{kind}.upper"]), kind
        assert torch.equal(after_upper[f"{kind}.small"], start[f"{kind}.small"]), kind
        assert not torch.equal(after_small[f"{kind}.small"], after_upper[f"{kind}.small"]), kind
        assert torch.equal(after_small[f"{kind}.upper"], after_upper[f"{kind}.upper"]), kind
