"""Update analysis on hand-made updates: norms, density at each tau, 90%-energy rank, KL."""

import math

import pytest
import torch

from retain.analysis import density, energy_rank, layer_index, next_token_kl, param_group, summarize


def test_norms_per_total_group_and_layer_are_the_hand_computed_ones():
    w0 = {"model.layers.0.self_attn.q_proj.weight": torch.full((2, 2), 2.0),
          "model.layers.1.mlp.up_proj.weight": torch.full((1, 4), 1.0)}
    dw = {"model.layers.0.self_attn.q_proj.weight": torch.tensor([[3.0, 0.0], [0.0, 4.0]]),
          "model.layers.1.mlp.up_proj.weight": torch.tensor([[0.0, 0.0, 0.0, 1e-5]])}
    out = summarize(((n, w0[n], w0[n] + dw[n]) for n in w0), taus=(1e-6, 1e-4))
    assert out["norm"]["abs"] == pytest.approx(math.sqrt(25 + 1e-10))
    assert out["norm"]["rel"] == pytest.approx(math.sqrt((25 + 1e-10) / (16 + 4)))
    assert out["groups"]["attn.q"] == pytest.approx({"abs": 5.0, "rel": 5.0 / 4.0})
    assert out["groups"]["mlp"]["abs"] == pytest.approx(1e-5, rel=1e-2)  # 1 + 1e-5 in float32
    assert out["layers"]["0"]["abs"] == pytest.approx(5.0)
    assert set(out["layers"]) == {"0", "1"}
    # 3 of 8 entries move by more than 1e-6 in float32 (1 + 1e-5 is representable to ~1e-7)...
    assert out["density"]["fp32"]["1e-06"] == pytest.approx(3 / 8)
    assert out["density"]["fp32"]["0.0001"] == pytest.approx(2 / 8)
    # ...but in bf16, 1 + 1e-5 rounds back to 1: that update vanishes.
    assert out["density"]["bf16"]["1e-06"] == pytest.approx(2 / 8)
    assert out["rank90"] == {"model.layers.0.self_attn.q_proj.weight": 2,
                             "model.layers.1.mlp.up_proj.weight": 1}
    assert out["entries"] == 8


def test_density_counts_strictly_above_tau():
    w0 = torch.zeros(4)
    w = torch.tensor([0.0, 1e-6, 2e-6, -3e-5])
    assert density(w0, w, 1e-6) == (2, 4)
    assert density(w0, w, 1e-5) == (1, 4)


def test_energy_rank_of_known_spectra():
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    def with_spectrum(s):
        return (u[:, :5] * torch.tensor(s, dtype=torch.float64)) @ v.T
    # energies 81, 16, 2, 1, 0 of 100: 81% after one, 97% after two.
    assert energy_rank(with_spectrum([9.0, 4.0, math.sqrt(2), 1.0, 0.0])) == 2
    assert energy_rank(with_spectrum([9.0, 4.0, math.sqrt(2), 1.0, 0.0]), energy=0.8) == 1
    assert energy_rank(with_spectrum([1.0] * 5)) == 5  # flat spectrum: 90% needs 5 of 5
    assert energy_rank(torch.zeros(3, 3)) == 0
    with pytest.raises(ValueError, match="matrix"):
        energy_rank(torch.zeros(3))


def test_groups_and_layers_from_parameter_names():
    assert param_group("model.layers.3.self_attn.k_proj.weight") == "attn.k"
    assert param_group("model.layers.3.self_attn.o_proj.lora_B.default.weight") == "attn.o"
    assert param_group("model.layers.3.mlp.gate_proj.weight") == "mlp"
    assert param_group("model.layers.3.input_layernorm.weight") == "norm"
    assert param_group("model.embed_tokens.weight") == "embed"
    assert layer_index("base_model.model.model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("model.norm.weight") is None


def test_next_token_kl_is_zero_for_equal_and_matches_hand_value():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.9, 0.1]]))
    assert next_token_kl(p, p) == 0.0
    assert next_token_kl(p, q) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-5)


def test_phase_flops_count_every_matmul_weight_and_mfu_needs_a_known_gpu():
    import torch.nn as nn

    from retain.analysis.cost import matmul_parameters, phase_cost
    from retain.models import load_model

    model, _ = load_model("tiny-random")
    # By hand: the weights of every Linear (the output head too, tied or not) and of every norm.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert matmul_parameters(model) == linear + norms
    n = matmul_parameters(model)
    full = phase_cost(n, n, tokens=1000, seconds=2.0, processes=1, device_name=None, precision="no")
    assert full["flops_estimate"] == 6 * n * 1000 and full["mfu"] is None  # 6N per token when all weights train
    lora = phase_cost(n, 100, tokens=1000, seconds=2.0, processes=2, device_name="NVIDIA H200", precision="bf16")
    assert lora["flops_estimate"] == (4 * n + 200) * 1000
    assert lora["mfu"] == round(lora["flops_estimate"] / 2.0 / (989e12 * 2), 4)
    assert lora["tokens_per_s_per_process"] == 250.0
    assert phase_cost(n, n, 1000, 2.0, 1, "NVIDIA H200", "no")["mfu"] is None  # float32: no single peak
