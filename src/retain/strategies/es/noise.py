"""Evolution-strategy mechanics: seeded noise per tensor, in-place perturbation with an exact
restore, and the update from z-scored rewards, with no perturbation ever held in memory.

Written by hand: no maintained library perturbs a transformers model in place tensor by
tensor (libraries such as ``evotorch`` keep whole parameter vectors per population
member, which is the memory this design avoids).

Noise: a shared noise table (the scheme of large-scale ES, Salimans et al. 2017): one
table of ``TABLE_SIZE`` standard normals, drawn once per process from a fixed seed on
the CPU (the same numbers on every device and in every worker). The noise of one chunk
(at most ``CHUNK`` entries) of one tensor of one member is the table window at an offset
hashed from (member seed, tensor, chunk), so two tensors of the same shape never share
noise and regenerating it costs a slice instead of a fresh draw: drawing SmolLM2's
134.5M Gaussians takes about a second on two CPU cores, and an iteration needs them
three times per member. Tied weights (one storage under two names) are perturbed once.

Exact restore: ``w + x - x`` is not always ``w`` in floating point. While perturbing, the
restore is computed once and the few entries that would not come back exactly are kept
(index and original value); restoring applies ``- x`` and puts those back. They are the
entries that ``+ x`` moved into a larger binade, so their share grows as sigma grows
against the weights' size: ~1% of SmolLM2's trained weights at sigma = 1e-3, ~4.6% of
random weights drawn with std 0.02. The work runs segment by segment (one chunk on the
CPU, several on a GPU) through a few reused segment-sized buffers, so an iteration
allocates almost nothing and the process's peak memory stays that of inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
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


TABLE_SIZE = 1 << 24  # 16M float32: 64 MB, 16x the largest window
TABLE_SEED = 0x5EED_CAFE
_tables: dict[str, torch.Tensor] = {}


def noise_table(device: torch.device | str) -> torch.Tensor:
    """The shared table on ``device`` (drawn on the CPU, so every device sees the same numbers)."""
    key = str(torch.device(device))
    if key not in _tables:
        gen = torch.Generator(device="cpu").manual_seed(TABLE_SEED)
        _tables[key] = torch.randn(TABLE_SIZE, generator=gen, dtype=torch.float32).to(device)
    return _tables[key]


def noise(seed: int, tensor: int, chunk: int, n: int, device: torch.device) -> torch.Tensor:
    """Standard normal noise of one chunk: a read-only float32 view into the shared table."""
    if n > CHUNK:
        raise ValueError(f"noise windows hold at most {CHUNK} entries, asked for {n}")
    offset = noise_seed(seed, tensor, chunk) % (TABLE_SIZE - CHUNK + 1)
    return noise_table(device)[offset:offset + n]


def full_noise(seed: int, tensor: int, p: torch.Tensor) -> torch.Tensor:
    """The whole noise tensor of ``p`` (tests and analysis; the strategy never builds it)."""
    flat = torch.cat([noise(seed, tensor, c, sl.stop - sl.start, p.device) for c, sl in chunks(p)])
    return flat.view(p.shape)


class _Buffers:
    """Segment-sized scratch tensors reused across segments, keyed by role and dtype.

    Fresh 4 MB temporaries per chunk made glibc keep freed blocks around (the process
    peak grew ~1.5x on the first iteration); reusing them keeps the peak at inference's.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, role: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (role, dtype, device)
        if key not in self._bufs or self._bufs[key].numel() < n:
            self._bufs[key] = torch.empty(max(n, CHUNK), dtype=dtype, device=device)
        return self._bufs[key][:n]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers: bit equality, faster than float comparison and exact for -0.0."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _where(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries. On the CPU through NumPy, whose bool scan is about twice
    as fast as ``Tensor.nonzero`` and is a tenth of a second per pass over 134.5M weights."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)


def _flat(p: torch.Tensor) -> torch.Tensor:
    if not p.is_contiguous():
        raise ValueError("evolution strategies perturb weights in place and need contiguous tensors")
    return p.data.view(-1)


# Entries checked together for an exact restore. Finding the entries to fix costs one
# device sync per segment: on a GPU, where a chunk's kernels take microseconds, a sync
# per 1M-entry chunk left it idle (the H200 check measured ~0.25-0.3 ms per chunk), so there a
# segment holds several chunks, of one tensor or of consecutive small ones. On the CPU a
# segment stays one chunk's size, so its buffers stay in cache between the passes.
SEGMENT = {"cpu": CHUNK}
SEGMENT_ELSEWHERE = 4 * CHUNK


@dataclass(frozen=True)
class _Piece:
    """One chunk of one tensor inside a segment: ``view`` is the weights, ``at`` its offset."""

    index: int
    chunk: int
    view: torch.Tensor
    at: int

    @property
    def span(self) -> slice:
        return slice(self.at, self.at + self.view.numel())


def _segments(params: list[tuple[str, torch.nn.Parameter]], capacity: int | None) -> list[list[_Piece]]:
    """Consecutive chunks of one dtype and device, grouped up to ``capacity`` entries each
    (``None``: the device's default). The grouping changes no weight, only the syncs."""
    segments: list[list[_Piece]] = []
    current: list[_Piece] = []
    used = 0
    for index, (_, p) in enumerate(params):
        flat = _flat(p)
        cap = capacity or SEGMENT.get(p.device.type, SEGMENT_ELSEWHERE)
        for c, sl in chunks(p):
            n = sl.stop - sl.start
            if current and (used + n > cap or current[0].view.dtype != p.dtype
                            or current[0].view.device != p.device):
                segments.append(current)
                current, used = [], 0
            current.append(_Piece(index, c, flat[sl], used))
            used += n
    if current:
        segments.append(current)
    return segments


@dataclass
class Perturbation:
    """``with Perturbation(params, seed, scale):`` weights are w + scale * noise inside, w after.

    ``move(seed, scale)`` goes straight to another member: each segment is restored and
    perturbed again while it is in cache, one pass over the weights instead of two.
    ``segment`` overrides the entries checked per device sync (tests; see ``SEGMENT``).
    """

    params: list[tuple[str, torch.nn.Parameter]]
    seed: int
    scale: float
    segment: int | None = None
    fixes: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    buffers: _Buffers = field(default_factory=_Buffers, repr=False)
    active: bool = False

    @torch.no_grad()
    def _sweep(self, restore: bool, apply: tuple[int, float] | None) -> None:
        get = self.buffers.get
        for s, pieces in enumerate(_segments(self.params, self.segment)):
            n = pieces[-1].span.stop
            dtype, device = pieces[0].view.dtype, pieces[0].view.device
            # The segment's true weights w, gathered: restored from the current member or copied.
            original = get("original", n, dtype, device)
            for pc in pieces:
                if restore:  # the same operation as the check below, so it gives back exactly `back`
                    torch.sub(pc.view, noise(self.seed, pc.index, pc.chunk, pc.view.numel(), device),
                              alpha=self.scale, out=original[pc.span])
                else:
                    original[pc.span].copy_(pc.view)
            fix = self.fixes.pop(s, None)
            if restore and fix is not None:
                original[fix[0]] = fix[1]
            if apply is None:
                for pc in pieces:
                    pc.view.copy_(original[pc.span])
                continue
            seed, scale = apply
            back = get("back", n, dtype, device)
            for pc in pieces:
                x = noise(seed, pc.index, pc.chunk, pc.view.numel(), device)
                torch.add(original[pc.span], x, alpha=scale, out=pc.view)
                # The restore above, computed once now: the entries whose bits would not come back.
                torch.sub(pc.view, x, alpha=scale, out=back[pc.span])
            wrong = _where(torch.ne(_bits(back), _bits(original), out=get("wrong", n, torch.bool, device)))
            if wrong.numel():
                # int32 positions (a segment is far below 2^31 entries): 4 bytes per fixed entry, not 8.
                self.fixes[s] = (wrong.to(torch.int32), original[wrong])
        if apply is not None:
            self.seed, self.scale = apply

    def __enter__(self) -> "Perturbation":
        self._sweep(restore=False, apply=(self.seed, self.scale))
        self.active = True
        return self

    def move(self, seed: int, scale: float) -> None:
        if not self.active:
            raise RuntimeError("move() needs an active perturbation (inside its with-block)")
        self._sweep(restore=True, apply=(seed, scale))

    def __exit__(self, *exc) -> None:
        if self.active:
            self._sweep(restore=True, apply=None)
            self.active = False

    @property
    def fixed_entries(self) -> int:
        return sum(w.numel() for w, _ in self.fixes.values())


def perturbed_members(params: list[tuple[str, torch.nn.Parameter]], members: Sequence[tuple[int, int]],
                      sigma: float, segment: int | None = None) -> Iterator[Perturbation]:
    """Each (seed, sign) member's perturbation in turn; the weights are exact again afterwards,
    also when the caller stops early or raises."""
    if not members:
        return
    (seed, sign), *rest = members
    with Perturbation(params, seed, sign * sigma, segment) as pert:
        yield pert
        for seed, sign in rest:
            pert.move(seed, sign * sigma)
            yield pert


def zscore(rewards: Sequence[float]) -> list[float]:
    """(r - mean) / std (population std); all zeros when every member scored the same."""
    r = torch.tensor(rewards, dtype=torch.float64)
    std = r.std(unbiased=False)
    if float(std) == 0.0:
        return [0.0] * len(rewards)
    return ((r - r.mean()) / std).tolist()


def _chunk_update(members: Sequence[tuple[int, int]], z: Sequence[float], index: int, c: int, sl: slice,
                  device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    n = sl.stop - sl.start
    update = (out if out is not None else torch.empty(n, dtype=torch.float32, device=device)).zero_()
    for (seed, sign), zm in zip(members, z):
        if zm != 0.0:
            update.add_(noise(seed, index, c, n, device), alpha=zm * sign)
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
    buffers = _Buffers()
    changed = 0
    for index, (name, p) in enumerate(params):
        flat = _flat(p)
        whole = None
        if top_fraction is not None and top_fraction < 1.0:
            whole = torch.cat([_chunk_update(members, z, index, c, sl, p.device) for c, sl in chunks(p)])
            keep = whole.abs().topk(max(1, round(top_fraction * whole.numel()))).indices
            whole = torch.zeros_like(whole).index_copy_(0, keep, whole[keep])
        for c, sl in chunks(p):
            n = sl.stop - sl.start
            update = (buffers.get("update", n, torch.float32, p.device).copy_(whole[sl]) if whole is not None
                      else _chunk_update(members, z, index, c, sl, p.device,
                                         buffers.get("update", n, torch.float32, p.device)))
            update.mul_(scale)
            view = flat[sl]
            if anchor is not None and anchor_decay:
                update.sub_(view.float() - anchor[name].view(-1)[sl].float(), alpha=anchor_decay)
            new = update.add_(view) if p.dtype == torch.float32 else (view.float() + update).to(p.dtype)
            # Summed on the device: an int() per chunk would be a device sync per chunk.
            changed = changed + torch.count_nonzero(torch.ne(_bits(new), _bits(view)))
            view.copy_(new)
    return int(changed)
