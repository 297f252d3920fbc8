"""Optional fused CPU kernels for the hottest per-tensor loops (numba, ``pip install
guardmerge[fast]``).

The chunked torch code in :mod:`.consensus`, :mod:`.sparsify` and :mod:`.selection` walks each
tensor in column chunks and makes about ten passes over ``[N, w]`` per chunk. The kernels here
make one, with the same float32 operations in the same order, so their results are bit-identical
to the chunked torch code (``tests/methods/fast/test_kernels.py`` checks it); the one exception,
DARE's L1 norms, are float64 sums that agree to float64 rounding. They cover:

- TIES election + disjoint merge after a magnitude trim or a DARE drop (:func:`consensus`);
- the counting pass of the exact k-th selection (:func:`band`) and the select inside the band
  (:func:`kth_counts`);
- DARE's L1 rescale norms (:func:`l1_norms`);
- DARE's random keep masks from torch's own generator stream (:func:`draw_keep`).

Without numba, or with ``GUARDMERGE_KERNELS=torch`` in the environment, everything runs the
chunked torch code. numba compiles the kernels on first use and caches them on disk, so the first
merge after an install is a few seconds slower.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

import numpy as np
import torch

_PARALLEL = 1 << 16  # columns from which a kernel splits its columns across threads
_BAND_SLACK = 4  # band buffer: this many times the expected band, plus _BAND_MIN
_BAND_MIN = 4096
T = TypeVar("T")
R = TypeVar("R")


def enabled() -> bool:
    """Whether the fused kernels run: numba importable and ``GUARDMERGE_KERNELS`` not ``torch``."""
    return os.environ.get("GUARDMERGE_KERNELS", "").lower() != "torch" and _numba_installed()


def usable(*tensors: torch.Tensor) -> bool:
    """:func:`enabled`, and every tensor a float32 (or bool) CPU tensor the kernels can read."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bool) for t in tensors) and enabled()


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


@functools.cache
def _compiled() -> ModuleType:
    from guardmerge.methods.fast import fused

    return fused


@dataclass(frozen=True)
class CutSpec:
    """A magnitude trim: keep ``|t_i| > threshold_i``, and ``|t_i| == threshold_i`` at flat
    columns ``< cutoff_i`` (the ties a quota keeps, earliest first)."""

    threshold: torch.Tensor  # [N] float32
    cutoff: torch.Tensor  # [N] int64


@dataclass(frozen=True)
class KeepSpec:
    """A DARE drop: keep where ``keep`` ``[N, d]`` (bool), times ``factor`` ``[N]`` (or 1)."""

    keep: torch.Tensor
    factor: torch.Tensor | None


@dataclass(frozen=True)
class ConsensusSpec:
    """The TIES aggregation: per-expert ``weights`` ``[N]``, the election's ``fallback`` sign
    where a column sums to exactly 0, and ``mean`` (disjoint mean) or not (disjoint sum)."""

    weights: torch.Tensor
    fallback: float
    mean: bool


def _spans(d: int, minimum: int = _PARALLEL) -> list[tuple[int, int]]:
    """``[c0, c1)`` ranges over ``d`` items, one per torch thread, each at least ``minimum`` long."""
    parts = max(1, min(torch.get_num_threads(), d // minimum))
    bounds = [d * j // parts for j in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def _map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]``: the first on this thread, the others on the kernel pool at
    the same time (the kernels release the GIL)."""
    if len(items) == 1:
        return [fn(items[0])]
    others = [_pool().submit(fn, x) for x in items[1:]]
    first = fn(items[0])
    return [first, *(f.result() for f in others)]


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """Threads for the kernels' column spans, started once per process (starting a thread per
    call costs about 0.3 ms, a good part of a small tensor's merge)."""
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads() - 1), thread_name_prefix="guardmerge-kernel")


def consensus(
    rows: torch.Tensor, sparse: CutSpec | KeepSpec | None, agg: ConsensusSpec, scaling: float
) -> tuple[torch.Tensor, int, float]:
    """``scaling * consensus(sparsify(rows))``: ``[N, d]`` float32 -> ``([d], zero_sums, mass)``.

    ``zero_sums`` counts the columns whose weighted sum is exactly 0 while an entry agrees with
    the fallback sign; ``mass`` is the sum of all weighted entries (float64), whose sign the
    per-tensor election falls back to (see :class:`.consensus.ChunkConsensus`).
    """
    k = _compiled()
    n, d = rows.shape
    values = _np(rows, torch.float32)
    threshold = np.zeros(n, np.float32)
    cutoff = np.zeros(n, np.int64)
    keep = np.zeros((1, 1), np.uint8)
    factor = np.ones(n, np.float32)
    kind = 0
    if isinstance(sparse, CutSpec):
        kind, threshold, cutoff = k.TRIM, _np(sparse.threshold, torch.float32), _np(sparse.cutoff, torch.int64)
    elif isinstance(sparse, KeepSpec):
        kind, keep = k.KEEP, _np_bool(sparse.keep)
        if sparse.factor is not None:
            factor = _np(sparse.factor, torch.float32)
    out = torch.empty(d, dtype=torch.float32)
    weights, fallback, scale, target = (
        _np(agg.weights, torch.float32),
        np.float32(agg.fallback),
        np.float32(scaling),
        out.numpy(),
    )

    def part(span: tuple[int, int]) -> tuple[int, float]:
        zero_sums, mass = k.consensus(
            values, weights, kind, threshold, cutoff, keep, factor, fallback, agg.mean, scale, target, *span
        )
        return int(zero_sums), float(mass)

    parts = _map(part, _spans(d))
    return out, sum(z for z, _ in parts), math.fsum(m for _, m in parts)


def nth_tie(row: torch.Tensor, threshold: float, q: int) -> int:
    """Flat index of the ``q``-th (0-based) entry of ``row`` ``[d]`` with ``|t| == threshold``
    (``d`` if there are not that many), scanning only as far as needed."""
    return int(_compiled().nth_tie(_np(row, torch.float32), np.float32(threshold), q))


def _np(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _np_bool(t: torch.Tensor) -> np.ndarray:
    """A bool tensor as the uint8 array the kernels read (no copy when contiguous)."""
    return t.contiguous().view(torch.uint8).numpy()


def l1_norms(rows: torch.Tensor, keep: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum |t_i|, sum over kept |t_i|)`` per row of ``rows`` ``[N, d]``: float64 ``[N]``,
    summed per fixed block of ``block`` columns, then the blocks in order (so the result does
    not depend on the number of threads)."""
    k = _compiled()
    values, kept = _np(rows, torch.float32), _np_bool(keep)
    n, d = values.shape
    blocks = max(1, -(-d // block))
    before, after = np.zeros((n, blocks)), np.zeros((n, blocks))
    _map(lambda span: k.l1_norms(values, kept, block, *span, before, after), _spans(blocks, minimum=1))
    return torch.from_numpy(before).sum(1), torch.from_numpy(after).sum(1)


_STATE_BYTES = 5056  # sizeof(at::CPUGeneratorImplState) in the pinned torch
_MT_N = 624


def draw_keep(generator: torch.Generator, count: int, density: float) -> torch.Tensor | None:
    """``torch.rand(count, generator=generator) < density``, bit for bit, about 3x faster: the
    generator's Mersenne Twister state is read, advanced by the kernel and written back, so
    later torch draws continue the same stream. ``None`` (nothing drawn) where the generator's
    state is not the layout this code knows; :func:`_draws_match_torch` checks it once."""
    if not _draws_match_torch():
        return None
    return _draw_keep(generator, count, density)


def _draw_keep(generator: torch.Generator, count: int, density: float) -> torch.Tensor | None:
    raw = generator.get_state()
    if raw.numel() != _STATE_BYTES or generator.device.type != "cpu":
        return None
    blob = raw.numpy().copy()
    # at::CPUGeneratorImplStateLegacy: seed u64 @0, left i32 @8, seeded i32 @12, next u64 @16,
    # state u64[624] @24 (each holding a uint32)
    position = np.array([blob[8:12].view(np.int32)[0], blob[16:24].view(np.uint64)[0]], np.int64)
    state = blob[24 : 24 + 8 * _MT_N].view(np.uint64).astype(np.uint32)
    out = np.empty(count, np.bool_)
    _compiled().draw_keep(state, position, np.float32(density), out)
    blob[8:12] = np.array([position[0]], np.int32).view(np.uint8)
    blob[16:24] = np.array([position[1]], np.uint64).view(np.uint8)
    blob[24 : 24 + 8 * _MT_N] = state.astype(np.uint64).view(np.uint8)
    generator.set_state(torch.from_numpy(blob))
    return torch.from_numpy(out)


@functools.cache
def _draws_match_torch() -> bool:
    """Whether :func:`draw_keep` reproduces torch here: the same draws across twists, and the
    same stream after them (checked once per process)."""
    ours, theirs = torch.Generator().manual_seed(20231), torch.Generator().manual_seed(20231)
    for count in (1, 700, 1900):
        got = _draw_keep(ours, count, 0.37)
        if got is None or not torch.equal(got, torch.rand(count, generator=theirs) < 0.37):
            return False
    return torch.equal(torch.rand(50, generator=ours), torch.rand(50, generator=theirs))


def band(row: torch.Tensor, lo: float, hi: float, absolute: bool, expected: int) -> tuple[int, torch.Tensor] | None:
    """``(count below lo, the values in [lo, hi])`` of ``row`` ``[d]`` (of ``|row|`` if
    ``absolute``) in one pass, or ``None`` when the band holds far more than ``expected``.
    The band's values come in no particular order (enough for a k-th value and counts)."""
    k = _compiled()
    values = _np(row, torch.float32)
    spans = _spans(values.shape[0])
    cap = (_BAND_SLACK * expected // len(spans) + _BAND_MIN) // 4  # per stream
    lo32, hi32 = np.float32(lo), np.float32(hi)

    def part(span: tuple[int, int]) -> tuple[int, list[np.ndarray]]:
        buf, counts = np.empty((4, cap), np.float32), np.zeros(4, np.int64)
        below = int(k.band(values, lo32, hi32, absolute, *span, buf, counts))
        if counts.max() >= cap:
            raise _Overflow
        return below, [buf[s, : counts[s]] for s in range(4)]

    try:
        parts = _map(part, spans)
    except _Overflow:
        return None
    return sum(b for b, _ in parts), torch.from_numpy(np.concatenate([x for _, xs in parts for x in xs]))


def kth_counts(values: torch.Tensor, k: int) -> tuple[float, int, int]:
    """The ``k``-th smallest (1-based) of ``values`` ``[m]``, how many are smaller and how many
    equal it (``-0.0 == +0.0``): exact, by a two-pass radix select (a band's few distinct
    half-precision values slow an introselect down several times)."""
    value, below, equal = _compiled().kth_counts(_np(values, torch.float32), k)
    return float(value), int(below), int(equal)


class _Overflow(Exception):
    """A band held far more values than expected (the caller falls back)."""
