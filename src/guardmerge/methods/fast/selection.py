"""Exact order statistics per expert, in memory (one tensor) or streamed (a whole model).

TIES and PCB rank each expert's entries over its *whole* flattened task vector (``scope:
global``, as in their papers). Materialising N flattened models is what this module avoids:
every streamed statistic is exact and is computed from a stream of per-tensor chunks
``[N, ...]`` (one row per expert), read a fixed number of times.

Conventions (shared by the in-memory and the streamed versions, so they agree exactly):

- Values are ranked as float32 (inputs of another dtype are cast first).
- ``-0.0`` and ``+0.0`` are the same value.
- Every value must be finite; a NaN or infinity raises :class:`CheckpointError`.
- **Flat order** of a stream: the row-major order inside each tensor, tensors in stream order.
  It only matters to break ties (see :func:`topk_mask`).
- **Quantile** (the PCB reference's ``sort``/``kthvalue`` convention): over ``d`` values sorted
  ascending (0-based), the ``q``-quantile is ``sorted[floor(d * q)]`` (clamped to ``d - 1``),
  i.e. the ``k``-th smallest with ``k = floor(d * q) + 1``, see :func:`quantile_rank`. The upper
  clip of PCB's outlier clamp is ``sorted[max(floor(d * (1 - q)) - 1, 0)]``, see
  :func:`upper_clip_rank`. ``floor(d * q)`` is computed exactly from the decimal value of ``q``
  (``0.29 * 100`` is 29, not 28).

Streaming (:class:`RadixSelector`): a float32 maps to a 32-bit key whose unsigned order is the
float order (:func:`order_keys`). Pass 1 counts the keys' upper 16 bits per expert (65,536
bins); that locates the bin holding the k-th smallest. Pass 2 counts the lower 16 bits of the
keys inside that bin only, which gives the k-th smallest's exact bit pattern, how many values lie
below it and how many equal it. Memory: ``N * 65,536`` counters per pass and per requested rank,
whatever the model size or the number of ties (bfloat16 checkpoints have many).

Every per-tensor computation here walks the tensor in **column chunks** of about 4M values
(:func:`column_chunks`), so its temporaries stay small even for a 30k x 768 embedding matrix.
Methods that must recompute values identically in two places (PCB's scores in ``prepare`` and
in the merge call) use the same chunking, so the results agree bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from guardmerge.errors import CheckpointError
from guardmerge.io.finite import all_finite
from guardmerge.methods.fast import kernels

log = logging.getLogger(__name__)

ValueStream = Callable[[], Iterator[tuple[str, torch.Tensor]]]
"""A factory of fresh iterators over ``(tensor name, values [N, ...])``; see the module doc."""

_BINS = 1 << 16
_HALF_BINS = 1 << 15
_KEY_OFFSET = 1 << 31
_LOW31 = 0x7FFFFFFF
CHUNK_ELEMENTS = 1 << 22
"""Values per column chunk (all experts together): bounds every temporary."""
_SMALL = 1 << 20  # up to this many values, kth_smallest uses torch.kthvalue in memory
ALL_TIES = 1 << 62
"""A tie quota meaning "keep every value equal to the threshold"."""


class EmptyStreamError(ValueError):
    """A streamed statistic was asked of a stream with no values."""


# ---------------------------------------------------------------------------- ranks and keys


def floor_fraction(n: int, fraction: float | Fraction) -> int:
    """``floor(n * fraction)``, exact for the decimal value of ``fraction`` (no float rounding)."""
    return int(exact_fraction(fraction) * n)


def quantile_rank(d: int, q: float | Fraction) -> int:
    """1-based rank of the ``q``-quantile of ``d`` values: ``floor(d * q) + 1``, in ``[1, d]``."""
    if d < 1:
        raise ValueError("quantile of an empty set")
    return min(floor_fraction(d, q) + 1, d)


def upper_clip_rank(d: int, q: float | Fraction) -> int:
    """1-based rank of PCB's upper clip: ``sorted[max(floor(d * (1 - q)) - 1, 0)]``."""
    if d < 1:
        raise ValueError("quantile of an empty set")
    return min(max(floor_fraction(d, 1 - exact_fraction(q)) - 1, 0) + 1, d)


def exact_fraction(value: float | Fraction) -> Fraction:
    """The decimal value of a float as written (``0.1`` is 1/10), or the fraction itself."""
    return value if isinstance(value, Fraction) else Fraction(str(value))


def _signed_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose *signed* order is the float order; ``-0.0`` is mapped to ``+0.0``.

    Non-negative floats keep their bit pattern; a negative float of magnitude bits ``m`` maps
    to ``-1 - m``.
    """
    bits = (values.to(torch.float32) + 0.0).contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & _LOW31)


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys in ``[0, 2**32)`` for float32 ``values`` (any shape).

    ``a < b`` iff ``key(a) < key(b)``; ``-0.0`` and ``+0.0`` share a key.
    """
    return _signed_keys(values).to(torch.int64) + _KEY_OFFSET


def keys_to_values(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`order_keys` (``-0.0`` comes back as ``+0.0``)."""
    signed = (keys.to(torch.int64) - _KEY_OFFSET).to(torch.int32)
    return (signed ^ ((signed >> 31) & _LOW31)).view(torch.float32)


def as_rows(values: torch.Tensor) -> torch.Tensor:
    """``[N, *shape]`` -> ``[N, prod(shape)]`` float32 (a view where possible)."""
    return values.reshape(values.shape[0], -1).to(torch.float32)


def column_chunks(rows: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, rows[:, start:start + w])`` over ``rows`` ``[N, d]``, ``w = 4M // N`` columns."""
    width = max(1, CHUNK_ELEMENTS // max(rows.shape[0], 1))
    for start in range(0, rows.shape[1], width):
        yield start, rows[:, start : start + width]


def check_finite(rows: torch.Tensor, name: str) -> None:
    """Raise :class:`CheckpointError` if ``rows`` ``[N, d]`` holds a NaN or an infinity."""
    if not all_finite(rows):
        raise CheckpointError(
            f"tensor '{name}': the task vectors contain NaN or infinite values; check the expert and base checkpoints"
        )


# ----------------------------------------------------------------------- k-th smallest value


@dataclass(frozen=True)
class KthResult:
    """The k-th smallest value per expert and rank, with the counts around it.

    Attributes:
        values: ``[N, M]`` float32, the k-th smallest of each row for each of M ranks.
        n_below: ``[N, M]`` int64, how many values are strictly smaller.
        n_equal: ``[N, M]`` int64, how many values equal it (>= 1).
        total: values per row.
    """

    values: torch.Tensor
    n_below: torch.Tensor
    n_equal: torch.Tensor
    total: int


def _check_ranks(ranks: Sequence[int], total: int) -> torch.Tensor:
    if not ranks:
        raise ValueError("no rank requested")
    for k in ranks:
        if not 1 <= k <= total:
            raise ValueError(f"rank {k} outside [1, {total}]")
    return torch.tensor(list(ranks), dtype=torch.int64)


def kth_smallest(rows: torch.Tensor, ranks: Sequence[int], absolute: bool = False) -> KthResult:
    """Exact k-th smallest of each row of ``rows`` ``[N, d]`` (of ``|rows|`` if ``absolute``).

    Small inputs use ``torch.kthvalue``; large ones a sampled bracket (:func:`_bracketed_kth`),
    or where that misses two :class:`RadixSelector` passes over column chunks (no copy of the
    input; ``torch.quantile``'s 16M limit never applies).
    """
    rows = as_rows(rows)
    _check_ranks(ranks, rows.shape[1])
    if rows.numel() > _SMALL:
        found = _bracketed_kth(rows, ranks, absolute)
        if found is not None:
            return found
        selector = RadixSelector(rows.shape[0])
        selector.observe(rows, absolute)
        selector.start_second_pass(ranks)
        selector.observe(rows, absolute)
        return selector.result()
    vals_in = rows.abs() if absolute else rows
    vals = torch.stack([torch.kthvalue(vals_in, k, dim=1).values for k in ranks], dim=1) + 0.0
    below = torch.stack([(vals_in < vals[:, j : j + 1]).sum(1) for j in range(len(ranks))], 1)
    equal = torch.stack([(vals_in == vals[:, j : j + 1]).sum(1) for j in range(len(ranks))], 1)
    return KthResult(vals, below, equal, rows.shape[1])


_SAMPLE = 1 << 14  # values sampled per row to bracket the k-th smallest
_SAMPLE_BLOCK = 32  # sampled in runs of this many adjacent values
_SAMPLE_SIGMAS = 5.0  # half-width of the bracket, in binomial standard deviations


def _bracketed_kth(rows: torch.Tensor, ranks: Sequence[int], absolute: bool = False) -> KthResult | None:
    """Exact k-th smallest of each row of ``rows`` ``[N, d]`` (of ``|rows|`` if ``absolute``) by
    sampling (Floyd & Rivest 1975).

    A fixed pseudo-random sample of each row brackets the k-th smallest between two sampled
    values ``lo <= hi``; one counting pass checks that the rank really falls between them and
    collects the few values inside, where an introselect (``np.partition``) finds it. Exact
    whatever the sample; ``None`` (a bracket missed, e.g. on adversarial data) sends the caller
    to the radix select. About three passes of cheap comparisons instead of two radix passes
    (one with the fused kernel, see :mod:`.kernels`).
    """
    n, d = rows.shape
    fused = d > _SAMPLE and kernels.usable(rows)
    vals = rows if fused or not absolute else rows.abs()
    if d <= _SAMPLE:
        sample = vals.sort(dim=1).values
    else:
        gen = torch.Generator().manual_seed(0)
        blocks = torch.randint(d // _SAMPLE_BLOCK, (_SAMPLE // _SAMPLE_BLOCK, 1), generator=gen) * _SAMPLE_BLOCK
        index = (blocks + torch.arange(_SAMPLE_BLOCK)).flatten()  # runs of adjacent values: cache-friendly
        sample = vals[:, index]
        sample = sample.abs() if fused and absolute else sample
        sample = torch.from_numpy(np.sort(sample.numpy(), axis=1))  # ~3x torch.sort on 16k values here
    m = sample.shape[1]
    values = torch.empty((n, len(ranks)), dtype=torch.float32)
    below = torch.empty((n, len(ranks)), dtype=torch.int64)
    equal = torch.empty((n, len(ranks)), dtype=torch.int64)
    for j, k in enumerate(ranks):
        p = (k - 0.5) / d
        half = _SAMPLE_SIGMAS * math.sqrt(m * p * (1 - p)) + 2
        i_lo, i_hi = max(int(p * m - half), 0), min(int(p * m + half) + 1, m - 1)
        for i in range(n):
            lo = float(sample[i, i_lo]) if i_lo > 0 else -math.inf  # no bound at the sample's ends
            hi = float(sample[i, i_hi]) if i_hi < m - 1 else math.inf
            counted = kernels.band(vals[i], lo, hi, absolute, (i_hi - i_lo + 1) * d // m) if fused else None
            if counted is not None:
                n_lo, band = counted
            else:  # the torch code (also where the kernel's band overflowed, e.g. on heavy ties)
                row = vals[i].abs() if fused and absolute else vals[i]
                n_lo = int(torch.count_nonzero(row < lo))  # strictly below the bracket
                band = row[(row >= lo) & (row <= hi)]
            if not n_lo < k <= n_lo + band.numel():
                return None
            # k-th inside the band: the kernel's radix select, or numpy's introselect (~2x torch.kthvalue)
            v, n_below, n_equal = (
                kernels.kth_counts(band, k - n_lo) if counted is not None else _kth_counts(band.numpy(), k - n_lo)
            )
            values[i, j] = v + 0.0
            below[i, j] = n_lo + n_below
            equal[i, j] = n_equal
    return KthResult(values, below, equal, d)


def _kth_counts(values: np.ndarray, k: int) -> tuple[float, int, int]:
    """The ``k``-th smallest (1-based) of ``values``, how many are smaller and how many equal it."""
    v = np.partition(values, k - 1)[k - 1]
    return float(v), int(np.count_nonzero(values < v)), int(np.count_nonzero(values == v))


class RadixSelector:
    """Exact k-th smallest per row over a stream of ``[N, ...]`` chunks, in two passes.

    Usage: call :meth:`observe` on every chunk (pass 1), then :meth:`start_second_pass` with the
    1-based ranks (``total`` is known by then), then :meth:`observe` on every chunk again, in any
    order (pass 2), then :meth:`result`.
    """

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows
        self.total = 0
        self._counts1 = torch.zeros(n_rows * _BINS, dtype=torch.int64)
        self._pass = 1
        self._ranks: torch.Tensor | None = None
        self._bins: torch.Tensor | None = None  # [N, M] int32 upper-16-bit bin of each target
        self._below1: torch.Tensor | None = None  # [N, M] count below that bin
        self._counts2: torch.Tensor | None = None
        self._pending: list[torch.Tensor] = []  # bin indices not yet counted (small tensors)
        self._pending_size = 0
        self._row = torch.arange(n_rows, dtype=torch.int32).unsqueeze(1)

    def observe(self, values: torch.Tensor, absolute: bool = False) -> None:
        """Count ``values`` ``[N, ...]`` (or their absolute values) in the current pass."""
        rows = as_rows(values)
        if rows.shape[0] != self.n_rows:
            raise ValueError(f"expected {self.n_rows} rows, got {rows.shape[0]}")
        for _, chunk in column_chunks(rows):
            keys = _signed_keys(chunk.abs() if absolute else chunk)
            upper = (keys >> 16) + _HALF_BINS  # [0, 65536)
            if self._pass == 1:
                self._count((upper + self._row * _BINS).reshape(-1))
            else:
                self._observe2(upper, keys & (_BINS - 1))
        if self._pass == 1:
            self.total += rows.shape[1]

    def _observe2(self, upper: torch.Tensor, lower: torch.Tensor) -> None:
        assert self._bins is not None
        n_ranks = self._bins.shape[1]
        hits = []
        for j in range(n_ranks):
            hit = upper == self._bins[:, j : j + 1]
            hits.append((lower + (self._row * n_ranks + j) * _BINS)[hit])
        self._count(torch.cat(hits))

    def _count(self, idx: torch.Tensor) -> None:
        """Queue bin indices; count them in one ``bincount`` per ~4M (amortises small tensors)."""
        self._pending.append(idx)
        self._pending_size += idx.numel()
        if self._pending_size >= CHUNK_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            counts = self._counts1 if self._pass == 1 else self._counts2
            assert counts is not None
            idx = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
            if idx.numel():
                counts += torch.bincount(idx, minlength=counts.numel())
        self._pending, self._pending_size = [], 0

    def has_non_finite(self) -> bool:
        """Whether pass 1 saw a NaN or an infinity (their keys fill the outermost bins)."""
        self._flush()
        counts = self._counts1.view(self.n_rows, _BINS)
        exp_bins = 0x7F80  # upper 16 bits of +inf; NaNs lie above, -inf/-NaN mirror below
        return bool(counts[:, _HALF_BINS + exp_bins :].any() or counts[:, : _HALF_BINS - exp_bins].any())

    def start_second_pass(self, ranks: Sequence[int]) -> None:
        """Fix the 1-based ranks wanted (the same for every row) and begin pass 2."""
        self._flush()
        self._ranks = _check_ranks(ranks, self.total)
        counts = self._counts1.view(self.n_rows, _BINS)
        cum = counts.cumsum(1)
        want = self._ranks.unsqueeze(0).expand(self.n_rows, -1).contiguous()
        bins = torch.searchsorted(cum, want)
        self._below1 = cum.gather(1, bins) - counts.gather(1, bins)
        self._bins = bins.to(torch.int32)
        self._counts2 = torch.zeros(self.n_rows * len(ranks) * _BINS, dtype=torch.int64)
        self._pass = 2

    def result(self) -> KthResult:
        """The k-th smallest values and counts (after pass 2)."""
        if self._pass != 2:
            raise RuntimeError("result() before the second pass")
        self._flush()
        assert self._ranks is not None and self._bins is not None
        assert self._below1 is not None and self._counts2 is not None
        n_ranks = self._ranks.numel()
        counts = self._counts2.view(self.n_rows, n_ranks, _BINS)
        cum = counts.cumsum(2)
        within = (self._ranks.unsqueeze(0) - self._below1).unsqueeze(2)  # 1-based rank in bin
        low = torch.searchsorted(cum, within).squeeze(2)  # [N, M]
        equal = counts.gather(2, low.unsqueeze(2)).squeeze(2)
        below = self._below1 + cum.gather(2, low.unsqueeze(2)).squeeze(2) - equal
        values = keys_to_values((self._bins.to(torch.int64) << 16) | low)
        return KthResult(values, below, equal, self.total)


def stream_kth_smallest(
    stream: ValueStream, ranks_for: Callable[[int], Sequence[int]], absolute: bool = False
) -> KthResult:
    """Exact k-th smallest per expert over a whole stream (two passes).

    Args:
        stream: factory of iterators over ``(name, values [N, ...])``.
        ranks_for: maps the number of values per expert to the 1-based ranks wanted.
        absolute: rank ``|values|`` (computed chunk by chunk, never copied whole).

    Raises:
        CheckpointError: a value is NaN or infinite (the tensor is named).
        EmptyStreamError: the stream has no values.
    """
    selector: RadixSelector | None = None
    for _, values in stream():
        selector = selector or RadixSelector(values.shape[0])
        selector.observe(values, absolute)
    if selector is None or selector.total == 0:
        raise EmptyStreamError("selection over an empty stream")
    if selector.has_non_finite():
        for name, values in stream():  # only on error: find the tensor to name
            check_finite(as_rows(values), name)
    selector.start_second_pass(ranks_for(selector.total))
    for _, values in stream():
        selector.observe(values, absolute)
    return selector.result()


# ----------------------------------------------------------------- exactly-k top selection


@dataclass(frozen=True)
class TopKCut:
    """Keep exactly ``k`` values per expert: all above ``threshold``, plus ties in flat order.

    The tie-breaking rule: the values are ordered by value descending, then by flat index
    ascending (the earlier entry wins a tie); the first ``k`` are kept. So every value strictly
    above ``threshold`` is kept, and of the values equal to it only the first ``quota`` (in flat
    order) are kept. ``k = 0`` is ``threshold = +inf``.

    Attributes:
        threshold: ``[N]`` float32, the k-th largest value per expert.
        quota: ``[N]`` int64, ties to keep in the tensor (per-tensor cuts) or, for a streamed
            cut, for every tensor not listed in ``tensor_quota`` (0 or :data:`ALL_TIES`).
        tensor_quota: for a streamed cut whose ties are split across tensors, the quota of each
            tensor by name; empty otherwise.
    """

    threshold: torch.Tensor
    quota: torch.Tensor
    tensor_quota: Mapping[str, torch.Tensor]

    def quota_for(self, name: str) -> torch.Tensor:
        """``[N]`` tie quota of tensor ``name``."""
        if self.tensor_quota:
            try:
                return self.tensor_quota[name]
            except KeyError:
                raise ValueError(
                    f"tensor '{name}' was not in the stream the global threshold was computed "
                    "over; merge it in the same scope as the prepare pass"
                ) from None
        return self.quota

    def masker(self, name: str = "") -> CutMasker:
        """A :class:`CutMasker` for tensor ``name``."""
        return CutMasker(self.threshold, self.quota_for(name))

    def to_globals(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flatten into ``ctx.globals`` entries under ``prefix``."""
        out = {f"{prefix}.threshold": self.threshold, f"{prefix}.quota": self.quota}
        for name, q in self.tensor_quota.items():
            out[f"{prefix}.quota:{name}"] = q
        return out

    @staticmethod
    def from_globals(values: Mapping[str, torch.Tensor], prefix: str) -> TopKCut:
        """Inverse of :meth:`to_globals`."""
        try:
            threshold = values[f"{prefix}.threshold"]
            quota = values[f"{prefix}.quota"]
        except KeyError:
            raise ValueError(
                f"global values '{prefix}.*' are missing: the method's prepare hook must run "
                "before a global-scope merge"
            ) from None
        mark = f"{prefix}.quota:"
        per_tensor = {k[len(mark) :]: v for k, v in values.items() if k.startswith(mark)}
        return TopKCut(threshold, quota, per_tensor)


def topk_cut(rows: torch.Tensor, k: int, absolute: bool = False) -> TopKCut:
    """The cut keeping exactly ``k`` of each row of ``rows`` ``[N, d]`` (one tensor)."""
    n, d = rows.shape
    if not 0 <= k <= d:
        raise ValueError(f"k={k} outside [0, {d}]")
    if k == 0:
        return TopKCut(torch.full((n,), float("inf")), torch.zeros(n, dtype=torch.int64), {})
    res = kth_smallest(rows, [d - k + 1], absolute)
    above = d - res.n_below[:, 0] - res.n_equal[:, 0]
    quota = k - above
    # every tie kept -> ALL_TIES, so masking is one comparison (see CutMasker)
    return TopKCut(res.values[:, 0], torch.where(quota >= res.n_equal[:, 0], ALL_TIES, quota), {})


def tie_cutoffs(rows: torch.Tensor, threshold: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """``[N]`` int64: per row of ``|rows|`` ``[N, d]``, the flat column before which values equal
    to ``threshold`` are kept: :class:`CutMasker`'s rule (the first ``quota`` ties in flat order)
    over the whole tensor, as one bound (``d``: every tie, ``0``: none)."""
    n, d = rows.shape
    out = torch.full((n,), d, dtype=torch.int64)
    fused = kernels.usable(rows)
    for i, q in enumerate(quota.tolist()):
        if q >= ALL_TIES:
            continue
        if q <= 0:
            out[i] = 0
            continue
        if fused:
            out[i] = kernels.nth_tie(rows[i], float(threshold[i]), q)
            continue
        ties = torch.nonzero(rows[i].to(torch.float32).abs() == threshold[i].to(torch.float32)).squeeze(1)
        if q < ties.numel():
            out[i] = ties[q]
    return out


class CutMasker:
    """The mask of a cut over one tensor's column chunks, given in flat (column) order.

    Each call takes the next chunk ``[N, w]`` of values and returns its bool mask: values above
    the threshold, plus ties while the tensor's quota lasts (the earliest ties win).
    """

    def __init__(self, threshold: torch.Tensor, quota: torch.Tensor) -> None:
        self.threshold = threshold.to(torch.float32).unsqueeze(1)
        self.remaining = quota.to(torch.int64).clone()
        self.keep_all_ties = bool((self.remaining >= ALL_TIES).all())

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(torch.float32)
        if self.keep_all_ties:  # no quota to count down
            return values >= self.threshold
        mask = torch.empty(values.shape, dtype=torch.bool)
        for i, left in enumerate(self.remaining.tolist()):  # one comparison per row, ties counted only
            t = self.threshold[i]  # while a finite quota lasts
            if left == 0:  # quota used up: strictly above
                torch.gt(values[i], t, out=mask[i])
                continue
            torch.ge(values[i], t, out=mask[i])
            if left >= ALL_TIES:
                continue
            equal = values[i] == t
            n_equal = int(torch.count_nonzero(equal))
            if n_equal > left:  # keep the first `left` ties of this chunk, drop the rest
                mask[i, torch.nonzero(equal).squeeze(1)[left:]] = False
            self.remaining[i] = max(left - n_equal, 0)
        return mask


def topk_mask(rows: torch.Tensor, threshold: torch.Tensor, quota: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Bool ``[N, d]``: values above ``threshold`` ``[N]``, plus the first ``quota`` ``[N]`` ties.

    See :class:`TopKCut` for the rule; "first" is the lowest flat index.
    """
    masker = CutMasker(threshold, quota)
    rows = as_rows(rows)
    return torch.cat([masker(c.abs() if absolute else c) for _, c in column_chunks(rows)], 1)


def stream_topk_cuts(
    stream: ValueStream, ks_for: Callable[[int], Sequence[int]], absolute: bool = False
) -> list[TopKCut]:
    """Exact exactly-k cuts per expert over a whole stream, for several ``k`` at once.

    Passes: two (:class:`RadixSelector`), plus one more only when some expert must keep part
    of the values tied at its threshold (then the quota is split across tensors in flat order).

    Args:
        stream: factory of iterators over ``(name, values [N, ...])``.
        ks_for: maps the number of values per expert to the counts ``k`` to keep (0..total).
        absolute: rank ``|values|``.
    """
    ks: list[int] = []

    def ranks_for(total: int) -> list[int]:
        ks.extend(ks_for(total))
        for k in ks:
            if not 0 <= k <= total:
                raise ValueError(f"k={k} outside [0, {total}]")
        return [total - k + 1 if k > 0 else total for k in ks]

    res = stream_kth_smallest(stream, ranks_for, absolute)
    n_rows = res.values.shape[0]
    cuts: list[TopKCut] = []
    partial: list[int] = []
    for j, k in enumerate(ks):
        if k == 0:
            inf = torch.full((n_rows,), float("inf"))
            cuts.append(TopKCut(inf, torch.zeros(n_rows, dtype=torch.int64), {}))
            continue
        keep_ties = k - (res.total - res.n_below[:, j] - res.n_equal[:, j])
        all_kept = keep_ties >= res.n_equal[:, j]
        quota = torch.where(all_kept, torch.full_like(keep_ties, ALL_TIES), keep_ties)
        cuts.append(TopKCut(res.values[:, j], quota, {}))
        if not bool(all_kept.all()):
            partial.append(j)
    if partial:
        log.debug("splitting threshold ties across tensors for %d cut(s)", len(partial))
        cuts = _split_ties(stream, cuts, partial, absolute)
    return cuts


def _split_ties(stream: ValueStream, cuts: list[TopKCut], partial: Iterable[int], absolute: bool) -> list[TopKCut]:
    """One more pass: give each tensor, in stream order, its share of each tie quota."""
    partial = list(partial)
    remaining = {j: cuts[j].quota.clone() for j in partial}
    per_tensor: dict[int, dict[str, torch.Tensor]] = {j: {} for j in partial}
    for name, values in stream():
        equal = {j: torch.zeros_like(remaining[j]) for j in partial}
        for _, chunk in column_chunks(as_rows(values)):
            vals = chunk.abs() if absolute else chunk
            for j in partial:
                equal[j] += (vals == cuts[j].threshold.unsqueeze(1)).sum(1)
        for j in partial:
            take = torch.minimum(equal[j], remaining[j])
            remaining[j] -= take
            per_tensor[j][name] = take
    out = list(cuts)
    for j in partial:
        out[j] = TopKCut(cuts[j].threshold, torch.zeros_like(cuts[j].quota), per_tensor[j])
    return out
