"""Evolution-strategy mechanics: seeded noise per tensor, in-place perturbation with an exact
restore, and the update from z-scored rewards, with no perturbation ever held in memory.

Written by hand: no maintained library perturbs a transformers model in place tensor by
tensor (libraries such as ``evotorch`` keep whole parameter vectors per population
member, which is the memory this design avoids).

Noise: every (member seed, tensor, chunk) triple has its own generator seed, so noise is
regenerated chunk by chunk (at most ``CHUNK`` numbers at a time) and two tensors of the
same shape never share noise. Tied weights (one storage under two names) are perturbed
once.

Exact restore: ``w + x - x`` is not always ``w`` in floating point. While perturbing, each
chunk's restore is computed once and the few entries that would not come back exactly
are kept (index and original value); restoring applies ``- x`` and puts those back. For
float32 weights and sigma = 1e-3 this list is a small fraction of the weights; for bf16
weights it is larger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

CHUNK = 1 << 20
_MASK = (1 << 63) - 1


def unique_parameters(params: Sequence[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters in order, each storage once (tied embeddings appear under two names)."""
    seen, out = set(), []
    for name, p in params:
        key = (p.data_ptr(), p.shape)
        if key not in seen:
            seen.add(key)
            out.append((name, p))
    return out


def noise_seed(seed: int, tensor: int, chunk: int) -> int:
    """A 63-bit generator seed for one chunk of one tensor of one member (SplitMix64 mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + tensor * 0xBF58476D1CE4E5B9 + chunk * 0x94D049BB133111EB + 1) & ((1 << 64) - 1)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * mult) & ((1 << 64) - 1)
    return (x ^ (x >> 31)) & _MASK


def chunks(p: torch.Tensor) -> Iterator[tuple[int, slice]]:
    n = p.numel()
    for c, start in enumerate(range(0, n, CHUNK)):
        yield c, slice(start, min(start + CHUNK, n))


def noise(seed: int, tensor: int, chunk: int, n: int, device: torch.device) -> torch.Tensor:
    """Standard normal noise of one chunk, float32, regenerated identically on every call."""
    gen = torch.Generator(device=device).manual_seed(noise_seed(seed, tensor, chunk))
    return torch.randn(n, generator=gen, device=device, dtype=torch.float32)


def full_noise(seed: int, tensor: int, p: torch.Tensor) -> torch.Tensor:
    """The whole noise tensor of ``p`` (tests and analysis; the strategy never builds it)."""
    flat = torch.cat([noise(seed, tensor, c, sl.stop - sl.start, p.device) for c, sl in chunks(p)])
    return flat.view(p.shape)


def _flat(p: torch.Tensor) -> torch.Tensor:
    if not p.is_contiguous():
        raise ValueError("evolution strategies perturb weights in place and need contiguous tensors")
    return p.data.view(-1)


@dataclass
class Perturbation:
    """``with Perturbation(params, seed, scale):`` weights are w + scale * noise inside, w after."""

    params: list[tuple[str, torch.nn.Parameter]]
    seed: int
    scale: float
    fixes: list[tuple[int, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def _step(self, index: int, p: torch.Tensor, c: int, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        flat = _flat(p)
        x = noise(self.seed, index, c, sl.stop - sl.start, p.device).mul_(self.scale).to(p.dtype)
        return flat[sl], x

    @torch.no_grad()
    def __enter__(self) -> "Perturbation":
        for index, (_, p) in enumerate(self.params):
            for c, sl in chunks(p):
                view, x = self._step(index, p, c, sl)
                original = view.clone()
                view.add_(x)
                wrong = torch.ne(view - x, original).nonzero().squeeze(1)
                if wrong.numel():
                    self.fixes.append((index, sl.start, wrong.to(torch.int32), original[wrong]))
        return self

    @torch.no_grad()
    def __exit__(self, *exc) -> None:
        for index, (_, p) in enumerate(self.params):
            for c, sl in chunks(p):
                view, x = self._step(index, p, c, sl)
                view.sub_(x)  # the very operation checked in __enter__
        for index, start, where, values in self.fixes:
            _flat(self.params[index][1])[start + where.long()] = values
        self.fixes = []

    @property
    def fixed_entries(self) -> int:
        return sum(w.numel() for _, _, w, _ in self.fixes)


def zscore(rewards: Sequence[float]) -> list[float]:
    """(r - mean) / std (population std); all zeros when every member scored the same."""
    r = torch.tensor(rewards, dtype=torch.float64)
    std = r.std(unbiased=False)
    if float(std) == 0.0:
        return [0.0] * len(rewards)
    return ((r - r.mean()) / std).tolist()


def _chunk_update(members: Sequence[tuple[int, int]], z: Sequence[float], index: int, c: int, sl: slice,
                  device: torch.device) -> torch.Tensor:
    update = torch.zeros(sl.stop - sl.start, dtype=torch.float32, device=device)
    for (seed, sign), zm in zip(members, z):
        if zm != 0.0:
            update += (zm * sign) * noise(seed, index, c, sl.stop - sl.start, device)
    return update


@torch.no_grad()
def apply_update(params: list[tuple[str, torch.nn.Parameter]], members: Sequence[tuple[int, int]],
                 z: Sequence[float], alpha: float, top_fraction: float | None = None,
                 anchor: dict[str, torch.Tensor] | None = None, anchor_decay: float = 0.0) -> int:
    """w += (alpha / N) * sum_m z_m * sign_m * noise(seed_m), chunk by chunk.

    ``top_fraction`` keeps only that fraction of each tensor's update coordinates (largest
    magnitude; this needs the tensor's whole update at once); ``anchor_decay`` then pulls
    w toward ``anchor`` (the base weights) by that fraction of the distance. Returns the
    number of weights that changed.
    """
    scale = alpha / len(members)
    changed = 0
    for index, (name, p) in enumerate(params):
        flat = _flat(p)
        whole = None
        if top_fraction is not None and top_fraction < 1.0:
            whole = torch.cat([_chunk_update(members, z, index, c, sl, p.device) for c, sl in chunks(p)])
            keep = whole.abs().topk(max(1, round(top_fraction * whole.numel()))).indices
            whole = torch.zeros_like(whole).index_copy_(0, keep, whole[keep])
        for c, sl in chunks(p):
            update = scale * (whole[sl] if whole is not None else _chunk_update(members, z, index, c, sl, p.device))
            if anchor is not None and anchor_decay:
                update -= anchor_decay * (flat[sl].float() - anchor[name].view(-1)[sl].float())
            new = (flat[sl].float() + update).to(p.dtype)
            changed += int((new != flat[sl]).sum())
            flat[sl] = new
    return changed
