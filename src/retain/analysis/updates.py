"""What a fine-tune did to the weights: norm, density and rank of dW = W - W0.

These are the figures behind the forgetting comparison of evolution strategies and
gradient methods: forgetting tracks how large and how dense the update is. The functions
on tensors are pure, so they are tested on hand-made updates; ``UpdateTracker`` applies
them to a live model during a run.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

import torch

TAUS = (1e-6, 1e-5)
_LAYER = re.compile(r"layers?\.(\d+)\.")
_GROUPS = (
    ("attn.q", ("q_proj",)), ("attn.k", ("k_proj",)), ("attn.v", ("v_proj",)), ("attn.o", ("o_proj",)),
    ("mlp", ("mlp.", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")),
    ("norm", ("norm", "ln_")), ("embed", ("embed", "wte", "wpe", "lm_head")),
)


def param_group(name: str) -> str:
    """The group a weight belongs to: attn.q/k/v/o, mlp, norm, embed or other."""
    for group, keys in _GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def density(w0: torch.Tensor, w: torch.Tensor, tau: float, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(entries with |W - W0| > tau, entries), both weights first cast to ``dtype``.

    Cast before subtracting: in bf16 many tiny float32 updates round away, which is what
    a bf16 checkpoint of the fine-tune would actually contain.
    """
    dw = w.to(dtype).float() - w0.to(dtype).float()
    return int((dw.abs() > tau).sum()), dw.numel()


def energy_rank(dw: torch.Tensor, energy: float = 0.9) -> int:
    """Smallest k such that the top-k singular values hold ``energy`` of ||dW||_F^2 (0 for dW = 0)."""
    if dw.dim() != 2:
        raise ValueError(f"energy rank needs a matrix, got shape {tuple(dw.shape)}")
    s2 = torch.linalg.svdvals(dw.double()) ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(s2, 0) / total
    # A tolerance keeps k from overshooting when the energy sits exactly on the threshold.
    return int((cumulative < energy - 1e-12).sum()) + 1


def summarize(pairs: Iterator[tuple[str, torch.Tensor, torch.Tensor]], taus=TAUS, energy: float = 0.9,
              ranks: bool = True) -> dict[str, Any]:
    """Norms (total, per group, per layer), density at each tau in float32 and bf16, and the
    90%-energy rank of every matrix, from (name, W0, W) triples."""
    sq = {"total": [0.0, 0.0]}  # name -> [sum dW^2, sum W0^2]
    groups: dict[str, list[float]] = {}
    layers: dict[str, list[float]] = {}
    counts = {prec: {str(t): 0 for t in taus} for prec in ("fp32", "bf16")}
    entries, rank = 0, {}
    for name, w0, w in pairs:
        w0f, wf = w0.detach().float(), w.detach().float()
        dw = wf - w0f
        d2, b2 = float((dw.double() ** 2).sum()), float((w0f.double() ** 2).sum())
        for table, key in ((sq, "total"), (groups, param_group(name)), (layers, str(layer_index(name)))):
            acc = table.setdefault(key, [0.0, 0.0])
            acc[0] += d2
            acc[1] += b2
        for t in taus:
            counts["fp32"][str(t)] += density(w0f, wf, t)[0]
            counts["bf16"][str(t)] += density(w0f, wf, t, torch.bfloat16)[0]
        entries += dw.numel()
        if ranks and dw.dim() == 2:
            rank[name] = energy_rank(dw, energy)

    def norms(acc: list[float]) -> dict[str, float]:
        return {"abs": math.sqrt(acc[0]), "rel": math.sqrt(acc[0] / acc[1]) if acc[1] else float("nan")}

    return {
        "norm": norms(sq["total"]),
        "groups": {g: norms(a) for g, a in sorted(groups.items())},
        "layers": {k: norms(a) for k, a in sorted(layers.items(), key=lambda kv: (kv[0] == "None", kv[0]))
                   if k != "None"},
        "density": {prec: {t: c / entries if entries else 0.0 for t, c in by_tau.items()}
                    for prec, by_tau in counts.items()},
        "rank90": rank,
        "entries": entries,
    }


def next_token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over rows of KL(p || q) between next-token distributions given as logits."""
    logp, logq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())
