"""Scale-out refusals before the model loads: QLoRA (`model_quantization`) and multi-process launches."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from retain.config import load_config
from retain.errors import RetainError
from retain.loop import check_run


def config(tiny_config, **kw):
    return load_config(tiny_config("q", **kw), [])


def test_full_fine_tuning_on_a_quantized_base_is_refused(tiny_config):
    with pytest.raises(RetainError, match=r"model_quantization: nf4 trains LoRA adapters on a frozen quantized "
                                          r"base; strategy 'naive' trains its own parameters \(naive\)"):
        check_run(config(tiny_config, model="some/model", model_quantization="nf4"))
    with pytest.raises(RetainError, match="strategy 'l2p' trains its own parameters"):
        check_run(config(tiny_config, model="some/model", model_quantization="int8", strategy="l2p"))


def test_lora_on_a_quantized_base_needs_a_gpu_and_bitsandbytes(tiny_config, monkeypatch):
    cfg = config(tiny_config, model="some/model", model_quantization="nf4", strategy="lora+replay")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RetainError, match="nf4 needs a CUDA GPU .*torch sees none here"):
        check_run(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(RetainError, match=r"needs bitsandbytes: pip install 'retain\[qlora\]'"):
        check_run(cfg)
    with pytest.raises(RetainError, match="tiny-random is built in memory"):
        check_run(config(tiny_config, model_quantization="nf4", strategy="lora"))


def test_the_recipe_is_nf4_with_double_quantization_and_bf16_compute():
    from retain.models.quantization import bnb_config

    nf4 = bnb_config("nf4")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config("int8").load_in_8bit


def test_an_unknown_quantization_names_the_valid_ones(tiny_config):
    from retain.errors import RetainError as E

    with pytest.raises((E, ValueError), match="nf4"):
        config(tiny_config, model_quantization="fp4")


def test_a_multi_process_launch_accepts_a_strategy_that_splits_and_refuses_one_that_does_not(tiny_config,
                                                                                           monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_run(config(tiny_config))  # naive splits its batches
    with pytest.raises(RetainError, match="strategy 'l2p' cannot run data-parallel"):
        check_run(config(tiny_config, strategy="l2p"))


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_flagged_as_slow(monkeypatch, native):
    from retain.loop import slow_cpu_precision

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert slow_cpu_precision("no", cpu=True) is None
    assert slow_cpu_precision("bf16", cpu=False) is None  # a GPU runs bf16 natively
    why = slow_cpu_precision("bf16", cpu=True)
    assert (why is None) == native
    if not native:
        assert "train.precision=bf16" in why and "set train.precision=no" in why
