"""numba-compiled loops behind :mod:`.kernels` (imported only when numba is installed).

Each function does in one pass what the chunked torch code does in several, with the same float32
operations in the same order, so the results are bit-identical (except :func:`l1_norms`, whose
float64 sums the compiler may reorder to vectorise). The per-column kernels work on a range
``[c0, c1)`` of float32 rows ``[N, d]``, in blocks of :data:`BLOCK` columns (everything a block
needs stays in L1 cache) with branch-free inner loops the compiler vectorises. ``nogil``: the
wrappers split the columns across threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

BLOCK = 512
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)

TRIM = 1  # keep |t| > threshold, or |t| == threshold at a column < cutoff
KEEP = 2  # keep where keep[i, p], times factor[i]


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def consensus(rows, weights, kind, threshold, cutoff, keep, factor, fallback, mean, scaling, out, c0, c1):  # type: ignore[no-untyped-def]
    """TIES election + disjoint merge of the sparsified rows, times ``scaling``, into ``out[c0:c1]``.

    ``s_i = t_i`` (trim: kept entries; keep: ``t_i * factor_i`` where kept), ``wd_i = s_i w_i``,
    ``total = sum_i wd_i`` (in order), ``gamma = sign(total)`` (``fallback`` where 0),
    ``agreeing = sum_i max(wd_i gamma, 0)``, ``divisor = sum_i w_i [wd_i gamma > 0]``; out is
    ``agreeing * gamma (/ divisor, 1 where 0) * scaling``. Returns the number of columns whose
    total is exactly 0 while some entry agrees with ``fallback``, and the float64 sum of the
    totals (the tensor's mass, whose sign is the election's fallback in per-tensor scope).
    """
    n = rows.shape[0]
    wd = np.empty((n, BLOCK), np.float32)
    total = np.empty(BLOCK, np.float32)
    agreeing = np.empty(BLOCK, np.float32)
    divisor = np.empty(BLOCK, np.float32)
    gamma = np.empty(BLOCK, np.float32)
    zero_sums = 0
    mass = 0.0
    for b0 in range(c0, c1, BLOCK):
        width = min(BLOCK, c1 - b0)
        total[:width] = _F0
        agreeing[:width] = _F0
        divisor[:width] = _F0
        for i in range(n):
            w = weights[i]
            if kind == TRIM:
                th = threshold[i]
                cut = cutoff[i]
                for q in range(width):
                    t = rows[i, b0 + q]
                    a = abs(t)
                    kept = (a > th) | ((a == th) & (b0 + q < cut))
                    v = (t if kept else _F0) * w
                    wd[i, q] = v
                    total[q] += v
            elif kind == KEEP:
                f = factor[i]
                for q in range(width):
                    v = ((rows[i, b0 + q] * f) if keep[i, b0 + q] else _F0) * w
                    wd[i, q] = v
                    total[q] += v
            else:
                for q in range(width):
                    v = rows[i, b0 + q] * w
                    wd[i, q] = v
                    total[q] += v
        for q in range(width):
            x = total[q]
            gamma[q] = _F1 if x > _F0 else (-_F1 if x < _F0 else fallback)
        for i in range(n):
            w = weights[i]
            for q in range(width):
                v = wd[i, q] * gamma[q]
                agree = v > _F0
                agreeing[q] += v if agree else _F0
                divisor[q] += w if agree else _F0
        for q in range(width):
            zero_sums += (total[q] == _F0) & (agreeing[q] > _F0)
            mass += total[q]
            merged = agreeing[q] * gamma[q]
            if mean:
                d = divisor[q]
                merged = merged / (d if d != _F0 else _F1)
            out[b0 + q] = merged * scaling
    return zero_sums, mass


@njit(nogil=True, cache=True, boundscheck=False)
def nth_tie(row, threshold, q):  # type: ignore[no-untyped-def]
    """Index of the ``q``-th (0-based) entry of ``row`` with ``|t| == threshold``, or ``len(row)``."""
    seen = 0
    for p in range(row.shape[0]):
        if abs(row[p]) == threshold:
            if seen == q:
                return p
            seen += 1
    return row.shape[0]


@njit(nogil=True, cache=True, boundscheck=False)
def band(row, lo, hi, absolute, c0, c1, buf, counts):  # type: ignore[no-untyped-def]
    """Over ``row[c0:c1]`` (``|row|`` if ``absolute``): how many values are ``< lo`` (returned),
    and the values in ``[lo, hi]`` copied into ``buf`` ``[4, cap]``: stream ``s`` holds
    ``counts[s]`` of them (in no particular order). ``counts[s] == cap`` means ``buf`` overflowed.

    Four independent streams, each value written unconditionally and kept by advancing its
    stream's count: no branch to mispredict and four times the instruction-level parallelism.
    """
    cap = buf.shape[1]
    f0 = 0
    f1 = 0
    f2 = 0
    f3 = 0
    below = 0
    end = c0 + (c1 - c0) // 4 * 4
    for p in range(c0, end, 4):
        a0 = abs(row[p]) if absolute else row[p]
        a1 = abs(row[p + 1]) if absolute else row[p + 1]
        a2 = abs(row[p + 2]) if absolute else row[p + 2]
        a3 = abs(row[p + 3]) if absolute else row[p + 3]
        below += (a0 < lo) + (a1 < lo) + (a2 < lo) + (a3 < lo)
        buf[0, f0] = a0
        buf[1, f1] = a1
        buf[2, f2] = a2
        buf[3, f3] = a3
        f0 += (a0 >= lo) & (a0 <= hi)
        f1 += (a1 >= lo) & (a1 <= hi)
        f2 += (a2 >= lo) & (a2 <= hi)
        f3 += (a3 >= lo) & (a3 <= hi)
        if max(max(f0, f1), max(f2, f3)) >= cap:
            counts[:] = cap
            return below
    for p in range(end, c1):
        a0 = abs(row[p]) if absolute else row[p]
        below += a0 < lo
        buf[0, f0] = a0
        f0 += (a0 >= lo) & (a0 <= hi)
        if f0 >= cap:
            counts[:] = cap
            return below
    counts[0] = f0
    counts[1] = f1
    counts[2] = f2
    counts[3] = f3
    return below


@njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "nsz"})
def l1_norms(rows, keep, block, b0, b1, before, after):  # type: ignore[no-untyped-def]
    """Per row and per column block ``j`` in ``[b0, b1)`` (``block`` columns each), float64
    sums of ``|t|`` into ``before[i, j]`` and of ``|t|`` where kept into ``after[i, j]``
    (vectorised: the order inside a block is the compiler's, the same on every run)."""
    n, d = rows.shape
    for i in range(n):
        for j in range(b0, b1):
            total = 0.0
            kept = 0.0
            for p in range(j * block, min(d, (j + 1) * block)):
                x = np.float64(abs(rows[i, p]))
                total += x
                kept += x if keep[i, p] else 0.0
            before[i, j] = total
            after[i, j] = kept


# ------------------------------------------------------------------- torch's CPU Mersenne Twister

_N = 624
_M = 397
_U = np.uint32


@njit(nogil=True, cache=True, boundscheck=False)
def _twist(state):  # type: ignore[no-untyped-def]
    """MT19937's state update, as ATen's ``mt19937_engine::next_state``."""
    for j in range(_N - _M):
        y = (state[j] & _U(0x80000000)) | (state[j + 1] & _U(0x7FFFFFFF))
        state[j] = state[j + _M] ^ (y >> _U(1)) ^ ((state[j + 1] & _U(1)) * _U(0x9908B0DF))
    for j in range(_N - _M, _N - 1):
        y = (state[j] & _U(0x80000000)) | (state[j + 1] & _U(0x7FFFFFFF))
        state[j] = state[j + _M - _N] ^ (y >> _U(1)) ^ ((state[j + 1] & _U(1)) * _U(0x9908B0DF))
    y = (state[_N - 1] & _U(0x80000000)) | (state[0] & _U(0x7FFFFFFF))
    state[_N - 1] = state[_M - 1] ^ (y >> _U(1)) ^ ((state[0] & _U(1)) * _U(0x9908B0DF))


@njit(nogil=True, cache=True, boundscheck=False)
def draw_keep(state, position, density, out):  # type: ignore[no-untyped-def]
    """``out[k] = uniform_k < density`` for the next ``len(out)`` float32 uniforms of a torch CPU
    generator: ``state`` ``uint32[624]`` and ``position`` ``[left, next]`` as in ATen's engine,
    both advanced in place. Each uniform is ATen's ``uniform_real<float>``: the low 24 bits of
    one tempered 32-bit draw, times 2**-24. Tempering runs over whole state blocks
    (vectorised) instead of one call per value."""
    count = out.shape[0]
    available = position[0] - 1  # values left before the engine twists again
    nxt = position[1]
    scale = np.float32(1.0 / 16777216.0)
    k = 0
    while k < count:
        if available == 0:
            _twist(state)
            nxt = 0
            available = _N
        take = min(available, count - k)
        for q in range(take):
            y = state[nxt + q]
            y ^= y >> _U(11)
            y ^= (y << _U(7)) & _U(0x9D2C5680)
            y ^= (y << _U(15)) & _U(0xEFC60000)
            y ^= y >> _U(18)
            out[k + q] = np.float32(y & _U(0xFFFFFF)) * scale < density
        k += take
        nxt += take
        available -= take
    position[0] = available + 1
    position[1] = nxt


@njit(nogil=True, cache=True, boundscheck=False)
def _order_key(bits):  # type: ignore[no-untyped-def]
    """uint32 key of a float32's bits whose order is the float order (``-0.0`` keyed as ``+0.0``)."""
    if bits == _U(0x80000000):
        bits = _U(0)
    return ~bits if bits & _U(0x80000000) else bits | _U(0x80000000)


@njit(nogil=True, cache=True, boundscheck=False)
def kth_counts(values, k):  # type: ignore[no-untyped-def]
    """The ``k``-th smallest (1-based) of float32 ``values``, how many are smaller and how many
    equal it: a two-pass radix select on 16-bit halves of the order keys (no sort; fast on the
    heavy ties of half-precision weights, where an introselect slows down)."""
    bits = values.view(np.uint32)
    high = np.zeros(1 << 16, np.int64)
    for i in range(bits.shape[0]):
        high[_order_key(bits[i]) >> _U(16)] += 1
    below = 0
    top = 0
    while below + high[top] < k:
        below += high[top]
        top += 1
    low = np.zeros(1 << 16, np.int64)
    for i in range(bits.shape[0]):
        key = _order_key(bits[i])
        if key >> _U(16) == top:
            low[key & _U(0xFFFF)] += 1
    bottom = 0
    while below + low[bottom] < k:
        below += low[bottom]
        bottom += 1
    key = (_U(top) << _U(16)) | _U(bottom)
    found = np.empty(1, np.uint32)
    found[0] = key & _U(0x7FFFFFFF) if key & _U(0x80000000) else ~key
    return found.view(np.float32)[0], below, low[bottom]
