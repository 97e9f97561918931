"""Training cost accounting: an estimate of the FLOPs a phase did and the model FLOPs utilization.

The estimate counts the matrix multiplies that dominate a decoder: per token, 2N FLOPs
forward, 2N for the gradients with respect to the activations, and 2T for the gradients of
the T trainable weights (N: every weight that multiplies activations, the input embedding
excluded and a tied output head counted; full fine-tuning has T = N, so 6N per token as in
the scaling-law papers; LoRA has a small T). Attention's sequence-squared term is left out,
which undercounts by a few percent at the lengths retain trains on.
"""

from __future__ import annotations

from typing import Any

#: Dense bf16/fp16 tensor-core peaks (FLOP/s) by the name torch reports, for MFU. Other
#: devices (CPUs, float32 runs) get no MFU: their peak is not one well-defined number.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def matmul_parameters(model) -> int:
    """N: weights that multiply activations (no input embedding lookup; a tied output head counts)."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inp is None:
        return total
    n = total - inp.weight.numel()
    if out is not None and out.weight is inp.weight:
        n += out.weight.numel()
    return n


def peak_flops(device_name: str | None, precision: str) -> float | None:
    if device_name is None or precision not in ("bf16", "fp16"):
        return None
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def phase_cost(n_matmul: int, trainable: int, tokens: int, seconds: float, processes: int,
               device_name: str | None, precision: str) -> dict[str, Any]:
    flops = float(tokens) * (4 * n_matmul + 2 * trainable)
    achieved = flops / seconds if seconds else None
    peak = peak_flops(device_name, precision)
    return {
        "num_processes": processes,
        "tokens_per_s_per_process": round(tokens / seconds / processes, 1) if seconds else None,
        "flops_estimate": flops,
        "achieved_tflops": round(achieved / 1e12, 4) if achieved else None,
        "mfu": round(achieved / (peak * processes), 4) if achieved and peak else None,
    }
