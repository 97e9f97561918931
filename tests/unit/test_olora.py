"""O-LoRA: the orthogonality penalty, frozen earlier adapters, and the penalty's effect."""

import pytest
import torch
from safetensors.torch import load_file

from retain.strategies.olora import orthogonality_penalty


def test_penalty_is_zero_for_orthogonal_subspaces_and_the_squared_overlap_otherwise():
    eye = torch.eye(6)
    previous, current = eye[:2], eye[2:5]  # rows span disjoint coordinate axes
    assert float(orthogonality_penalty([previous], current)) == 0.0
    assert float(orthogonality_penalty([], current)) == 0.0
    a = torch.tensor([[1.0, 2.0, 0.0]])
    b = torch.tensor([[3.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    # A_i A_t^T = [[3, 2]] -> 9 + 4; two earlier adapters add their terms.
    assert float(orthogonality_penalty([a], b)) == 13.0
    assert float(orthogonality_penalty([a, a], b)) == 26.0


def _run(tiny_config, name, lam):
    from retain.config import load_config
    from retain.loop import execute, run_dir_for

    cfg = load_config(tiny_config(name, strategy="olora", train__max_steps=6,
                                  olora={"r": 4, "alpha": 8, "lambda_orth": lam}))
    return execute(cfg, quiet=True), run_dir_for(cfg)


def test_olora_freezes_earlier_adapters_and_the_penalty_lowers_their_overlap(tiny_config):
    from retain.loop import restore

    free, _ = _run(tiny_config, "free", 0.0)
    results, run = _run(tiny_config, "orth", 1000.0)
    assert results["strategy_stats"][1]["olora"]["overlap"] < 0.1 * free["strategy_stats"][1]["olora"]["overlap"]
    ctx, _ = restore(run)
    saved = load_file(run / "adapters" / "upper" / "adapter_model.safetensors")
    state = {k: v for k, v in ctx.model.state_dict().items() if ".upper." in k}
    assert saved and len(saved) == len(state)
    for key, value in saved.items():  # task 1's adapter did not move while task 2 trained
        match = [v for k, v in state.items() if k.endswith(key.split("base_model.model.")[-1].replace(".weight", ".upper.weight"))]
        assert len(match) == 1 and torch.equal(match[0].cpu(), value), key
    assert (run / "adapters" / "olora-sum" / "adapter_model.safetensors").is_file()
    with pytest.raises(Exception, match="joint trains every task in one phase"):
        from retain.config import load_config

        load_config(tiny_config("j", strategy="olora+joint"))
