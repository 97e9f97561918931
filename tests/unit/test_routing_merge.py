"""Task routing (nearest centroid), merged per-task adapters, and the task-agnostic evaluation."""

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from retain.routing import TaskRouter


@pytest.fixture(scope="module")
def tiny():
    from retain.models import load_model

    return load_model("tiny-random", seed=0)


def _ctx(model, tokenizer):
    cfg = SimpleNamespace(eval=SimpleNamespace(batch_size=8), train=SimpleNamespace(max_length=64))
    return SimpleNamespace(model=model, tokenizer=tokenizer, config=cfg)


def test_router_picks_the_task_of_well_separated_inputs(tiny):
    model, tokenizer = tiny
    ctx = _ctx(model, tokenizer)
    words = ["cat", "dog", "sun", "sky", "red", "map", "pen", "cup", "hat", "box"]
    animals = [f"the {w} sat on the mat and the {w} slept" for w in words]
    digits = [f"{i} {i + 1} {i + 2} 7 8 9 0 {i}" for i in range(10)]
    router = TaskRouter(contextlib.nullcontext)
    router.add_task(ctx, "text", animals[:6])
    router.add_task(ctx, "digits", digits[:6])
    assert router.predict(ctx, animals[6:] + digits[6:]) == ["text"] * 4 + ["digits"] * 4
    copy = TaskRouter(contextlib.nullcontext)
    copy.load(json.loads(json.dumps(router.state())))
    assert copy.predict(ctx, digits[6:]) == ["digits"] * 4
    with pytest.raises(ValueError, match="nothing to route"):
        TaskRouter(contextlib.nullcontext).predict(ctx, ["x"])


def _lora_model(tiny):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    import copy

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                          adapter_name="first")
    peft.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at zero: make each adapter do something
    return peft.eval()


@pytest.mark.parametrize("method,density", [("linear", 0.5), ("ties", 1.0), ("cat", 0.5)])
def test_merging_one_adapter_gives_that_adapter(tiny, method, density):
    from retain.strategies.merge import merge_adapters, use_adapter

    model = _lora_model(tiny)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with use_adapter(model, "first"):
        want = model(ids).logits
    with model.disable_adapter():
        base = model(ids).logits
    assert not torch.allclose(want, base, atol=1e-4)  # the adapter changes the output
    merge_adapters(model, ["first"], [1.0], method, "m", density)
    with use_adapter(model, "m"):
        assert torch.allclose(model(ids).logits, want, atol=1e-5)
    merge_adapters(model, ["first", "second"], [0.5, 0.5], method, "m", density)  # replaced, not duplicated
    with use_adapter(model, "m"):
        assert not torch.allclose(model(ids).logits, want, atol=1e-4)


def test_merge_needs_per_task_adapters_and_one_weight_per_task(tiny_config):
    from retain.config import load_config
    from retain.errors import RetainError
    from retain.loop import execute

    from retain.loop import run_dir_for

    with pytest.raises(RetainError, match="needs 'lora-per-task' in the same run, e.g. lora-per-task\\+merge"):
        load_config(tiny_config("m1", strategy="lora+merge"))
    cfg = load_config(tiny_config("m2", strategy="lora-per-task+merge", merge={"weights": [1.0]}))
    with pytest.raises(RetainError, match="merge.weights has 1 values; the stream has 2 tasks"):
        execute(cfg, quiet=True)
    assert not run_dir_for(cfg).exists()  # refused before anything was written


def test_per_task_run_reports_routing_and_merged_adapters(tiny_config, tmp_path):
    from typer.testing import CliRunner

    from retain.cli import app
    from retain.config import load_config
    from retain.loop import execute, run_dir_for

    cfg = load_config(tiny_config("pt", strategy="lora-per-task+merge", merge={"methods": ["linear", "ties"]}))
    results = execute(cfg, quiet=True)
    run = run_dir_for(cfg)
    routing = results["routing"]
    assert set(routing["scores"]) == {"upper", "small"} and 0 <= routing["accuracy"] <= 100
    for task, counts in routing["confusion"].items():
        assert sum(counts.values()) == 6  # every test example routed somewhere
        assert routing["per_task_accuracy"][task] == pytest.approx(100 * counts.get(task, 0) / 6, abs=0.01)
    # "upper w" and "is i small?" inputs are far apart: the router gets them right.
    assert routing["accuracy"] == 100.0
    assert routing["scores"] == pytest.approx(dict(zip(results["tasks"], results["R"][-1])))
    merge = results["final"]["merge"]
    assert merge["adapters"] == ["upper", "small"] and set(merge["methods"]) == {"linear", "ties"}
    assert merge["methods"]["linear"]["weights"] == [0.5, 0.5] and merge["methods"]["ties"]["weights"] == [1.0, 1.0]
    for m in ("linear", "ties"):
        assert (run / "adapters" / f"merged-{m}" / "adapter_model.safetensors").is_file()
        assert set(merge["methods"][m]["scores"]) == {"upper", "small"}
    report = (run / "report.md").read_text()
    assert "## Task-agnostic evaluation" in report and "## Merged adapters" in report
    result = CliRunner().invoke(app, ["generate", str(run), "is 3 small?", "--max-new-tokens", "2"])
    assert result.exit_code == 0 and "routed to task 'small'" in result.output
