"""Mixture of LoRA experts: k-means, routing of clustered inputs, frozen old experts."""

import torch

from retain.strategies.lora_experts import ExpertMixture, ExpertOptions, kmeans


def test_kmeans_recovers_well_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.eye(3) * 5
    points = torch.cat([c + 0.1 * torch.randn(20, 3, generator=gen) for c in centers])
    cents, labels = kmeans(points, 3, seed=1)
    groups = [set(labels[i * 20:(i + 1) * 20].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    assert kmeans(points[:2], 5)[0].shape[0] == 2  # never more clusters than points


def test_hand_made_clustered_inputs_go_to_their_expert(tiny_config):
    from retain.models import load_model
    from retain.strategies.lora_experts import LoraExperts
    from retain.streams.task import Example, Task
    from types import SimpleNamespace

    model, tok = load_model("tiny-random", seed=0)
    animals = [f"the {w} sat on the mat and the {w} slept" for w in ["cat", "dog", "cow", "pig", "hen", "fox"]]
    digits = [f"{i} {i + 1} {i + 2} 7 8 9 0 {i}" for i in range(6)]
    task = Task("mixed", [Example(x, "y") for x in animals[:4] + digits[:4]], [])
    strategy = LoraExperts(ExpertOptions(clusters_per_task=2, r=2))
    ctx = SimpleNamespace(model=model, tokenizer=tok, accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                          config=SimpleNamespace(seed=0, eval=SimpleNamespace(batch_size=8)))
    ctx.model = strategy.setup(ctx)
    strategy.before_task(ctx, [task])
    strategy.after_task(ctx, [task])
    mix: ExpertMixture = ctx.model
    assert len(mix.cluster_expert) == 2
    from retain.evaluation.scoring import left_pad

    ids, mask = left_pad([tok(t)["input_ids"] for t in animals + digits], tok.pad_token_id)
    mix(input_ids=ids, attention_mask=mask)
    routes = mix.last_routes
    assert len(set(routes[:6])) == 1 and len(set(routes[6:])) == 1 and routes[0] != routes[6]

    # A second task adds its own experts; training it leaves the first task's bit-equal.
    second = Task("second", [Example(f"question {i} about colors", "y") for i in range(4)], [])
    old = {n: p.detach().clone() for n, p in mix.named_parameters() if "mixed_" in n}
    strategy.before_task(ctx, [second])
    params = strategy.trainable_parameters(ctx)
    assert not any(p is q for p in params for n, q in mix.named_parameters() if "mixed_" in n)
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    for _ in range(2):
        out = mix(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(torch.equal(p, old[n]) for n, p in mix.named_parameters() if "mixed_" in n)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in mix.named_parameters() if ".B.second_" in n)


def test_lora_experts_run_freezes_earlier_experts_and_the_base(tiny_config):
    from retain.config import load_config
    from retain.loop import execute, restore, run_dir_for
    from retain.models import load_model

    cfg = load_config(tiny_config("moe", strategy="lora-experts", train__max_steps=4,
                                  lora_experts={"clusters_per_task": 2, "r": 2}))
    results = execute(cfg, quiet=True)
    assert results["strategy_stats"][-1]["lora-experts"]["experts"] == 2 * 2 + 1
    ctx, _ = restore(run_dir_for(cfg))
    fresh = dict(load_model("tiny-random", seed=cfg.seed)[0].named_parameters())
    for name, p in ctx.model.named_parameters():
        if ".A." not in name and ".B." not in name:
            assert torch.equal(p.cpu(), fresh[name[len("base."):].replace(".base.", ".")]), name
    b_of_upper = [p for n, p in ctx.model.named_parameters() if ".B.upper_" in n]
    assert b_of_upper and any(bool(p.abs().sum() > 0) for p in b_of_upper)  # upper's experts were trained
