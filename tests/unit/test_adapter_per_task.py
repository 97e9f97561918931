"""Bottleneck adapters: identity at initialization, isolated per task, saved and loaded back."""

import copy

import pytest
import torch

from retain.strategies.adapter_per_task import (AdapterOptions, add_adapter, insert_slots, load_adapter,
                                                save_adapter, set_active, slots)


@pytest.fixture(scope="module")
def tiny():
    from retain.models import load_model

    return load_model("tiny-random", seed=0)


IDS = torch.tensor([[1, 7, 3, 9, 4, 2]])


def test_a_fresh_adapter_is_exactly_the_identity(tiny):
    model = copy.deepcopy(tiny[0]).eval()
    want = model(IDS).logits
    n = insert_slots(model, ["o_proj", "down_proj"])
    assert n == 2 * model.config.num_hidden_layers
    add_adapter(model, "a", AdapterOptions(bottleneck=4))
    set_active(model, "a")
    assert torch.equal(model(IDS).logits, want)
    with pytest.raises(ValueError, match="match no linear layer; linear layers here: .*q_proj"):
        insert_slots(copy.deepcopy(tiny[0]), ["nope"])


def test_adapters_are_isolated_and_round_trip_through_files(tiny, tmp_path):
    model = copy.deepcopy(tiny[0]).eval()
    opts = AdapterOptions(bottleneck=4)
    insert_slots(model, opts.target_modules)
    add_adapter(model, "a", opts)
    add_adapter(model, "b", opts)
    with torch.no_grad():
        for slot in slots(model):
            slot.adapters["a"].up.weight.normal_(0, 0.5)
    set_active(model, "a")
    out_a = model(IDS).logits
    set_active(model, "b")
    out_b = model(IDS).logits
    set_active(model, None)
    assert torch.equal(out_b, model(IDS).logits) and not torch.allclose(out_a, out_b)  # b untouched by a
    save_adapter(model, "a", opts, tmp_path / "a")
    fresh = copy.deepcopy(tiny[0]).eval()
    load_adapter(fresh, tmp_path / "a", "served")
    set_active(fresh, "served")
    assert torch.equal(fresh(IDS).logits, out_a)


def test_adapter_per_task_run_trains_only_the_current_task_and_routes(tiny_config):
    from safetensors.torch import load_file

    from retain.config import load_config
    from retain.loop import execute, restore, run_dir_for

    cfg = load_config(tiny_config("apt", strategy="adapter-per-task", train__max_steps=4,
                                  adapter={"bottleneck": 4}))
    results = execute(cfg, quiet=True)
    run = run_dir_for(cfg)
    assert results["metrics"]["BWT"] == 0.0  # each task scored with its own, untouched adapter
    assert results["routing"]["accuracy"] == 100.0
    assert results["strategy_stats"][0]["adapter-per-task"]["parameters_per_task"] > 0
    ctx, _ = restore(run)
    saved = load_file(run / "adapters" / "upper" / "adapter_model.safetensors")
    final = {k.replace(".adapters.upper.", ".adapters.ADAPTER."): v for k, v in ctx.model.state_dict().items()
             if ".adapters.upper." in k}
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k].cpu()) for k in saved)
    from retain.models import load_model

    fresh = dict(load_model("tiny-random", seed=cfg.seed)[0].named_parameters())
    for name, p in ctx.model.named_parameters():  # the base did not move
        if ".adapters." not in name:
            assert torch.equal(p.cpu(), fresh[name.replace(".base.", ".")]), name
