"""Exact order statistics: keys, quantile convention, streamed k-th smallest, exactly-k cuts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guardmerge.errors import CheckpointError
from guardmerge.methods.fast.selection import (
    ALL_TIES,
    EmptyStreamError,
    TopKCut,
    floor_fraction,
    keys_to_values,
    kth_smallest,
    order_keys,
    quantile_rank,
    stream_kth_smallest,
    stream_topk_cuts,
    topk_cut,
    topk_mask,
    upper_clip_rank,
)


def pieces(rows: torch.Tensor, sizes: list[int]) -> list[tuple[str, torch.Tensor]]:
    """Split ``[N, d]`` into named column blocks (the fake model's tensors)."""
    out, start = [], 0
    for i, s in enumerate(sizes):
        out.append((f"t{i}", rows[:, start : start + s]))
        start += s
    assert start == rows.shape[1]
    return out


def as_stream(parts: list[tuple[str, torch.Tensor]]):
    return lambda: iter(parts)


def test_order_keys_are_monotone_and_invertible() -> None:
    special = torch.tensor([-3.0e38, -1.0, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1.0, 2.0, 3.0e38, float("inf")])
    x = torch.cat([special, torch.randn(500, generator=torch.Generator().manual_seed(0))])
    keys = order_keys(x)
    order = torch.argsort(x, stable=True)
    assert torch.all(keys[order][1:] >= keys[order][:-1])
    assert int(order_keys(torch.tensor([-0.0]))) == int(order_keys(torch.tensor([0.0])))
    back = keys_to_values(keys)
    assert torch.equal(back, x + 0.0)
    assert int(keys.min()) >= 1 and int(keys.max()) < 2**32


def test_floor_fraction_is_exact_for_decimal_inputs() -> None:
    assert 0.29 * 100 < 29  # the float product rounds down...
    assert floor_fraction(100, 0.29) == 29  # ...the exact decimal one does not
    assert floor_fraction(10, 0.3) == 3
    assert floor_fraction(7, 1.0) == 7
    assert floor_fraction(3, 0.2) == 0


@pytest.mark.parametrize("d", [1, 2, 7, 100, 101, 1000])
@pytest.mark.parametrize("q", [0.0, 0.01, 0.1, 0.5, 0.9, 0.99])
def test_quantile_convention_matches_sorted_index(d: int, q: float) -> None:
    x = np.random.default_rng(d).standard_normal(d).astype(np.float32)
    s = np.sort(x)
    k = quantile_rank(d, q)
    assert s[k - 1] == s[min(math.floor(round(d * q, 9)), d - 1)]
    if (d * q) % 1 > 1e-9:  # away from integers it is numpy's inverted_cdf
        assert s[k - 1] == np.quantile(x, q, method="inverted_cdf")
    # the PCB reference's upper clip: sorted[int(d * (1 - q) - 1)]
    ref_hi = int(round(d * (1 - q), 9) - 1)
    assert s[upper_clip_rank(d, q) - 1] == s[max(ref_hi, 0)]


def test_kth_smallest_matches_numpy_and_kthvalue() -> None:
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 257, generator=g)
    rows[:, :40] = 0.25  # ties
    ranks = [1, 40, 41, 128, 257]
    res = kth_smallest(rows, ranks)
    for j, k in enumerate(ranks):
        assert torch.equal(res.values[:, j], torch.kthvalue(rows, k, dim=1).values)
        s = np.sort(rows.numpy(), axis=1)[:, k - 1]
        assert np.array_equal(res.values[:, j].numpy(), s)
        assert torch.equal(res.n_below[:, j], (rows < res.values[:, j : j + 1]).sum(1))
        assert torch.equal(res.n_equal[:, j], (rows == res.values[:, j : j + 1]).sum(1))


@pytest.mark.parametrize("kind", ["normal", "bf16_ties", "signed_mixed"])
def test_streamed_kth_equals_flattened_reference(kind: str) -> None:
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(4, 600, generator=g)
    if kind == "bf16_ties":  # bfloat16 values: every bin of the first pass is one value
        rows = (rows * 1e-3).to(torch.bfloat16).to(torch.float32)
    if kind == "signed_mixed":
        rows[:, ::7] = -0.0
        rows[:, 1::7] = 0.0
        rows[0] = 3.0  # a constant row
    parts = pieces(rows, [100, 1, 0, 250, 249])
    ranks = [1, 6, 300, 599, 600]
    res = stream_kth_smallest(as_stream(parts), lambda d: ranks)
    ref = kth_smallest(rows, ranks)
    assert res.total == 600
    assert torch.equal(res.values, ref.values)
    assert torch.equal(res.n_below, ref.n_below)
    assert torch.equal(res.n_equal, ref.n_equal)


def test_stream_rejects_non_finite_and_empty() -> None:
    bad = torch.tensor([[1.0, float("nan")]])
    with pytest.raises(CheckpointError, match="t0"):
        stream_kth_smallest(as_stream([("t0", bad)]), lambda d: [1])
    with pytest.raises(EmptyStreamError):
        stream_kth_smallest(as_stream([]), lambda d: [1])
    with pytest.raises(ValueError, match="rank"):
        stream_kth_smallest(as_stream([("t0", torch.ones(1, 3))]), lambda d: [4])


def test_topk_mask_keeps_exactly_k_breaking_ties_by_lower_index() -> None:
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    cut = topk_cut(x, 2)
    assert cut.threshold.tolist() == [3.0, 5.0]
    assert cut.quota.tolist() == [2, 2]
    mask = topk_mask(x, cut.threshold, cut.quota)
    assert mask.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    # k = 0 and k = d
    assert not topk_mask(x, topk_cut(x, 0).threshold, topk_cut(x, 0).quota).any()
    full = topk_cut(x, 5)
    assert topk_mask(x, full.threshold, full.quota).all()


def test_streamed_cuts_equal_flattened_cut_with_ties_across_tensors() -> None:
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(3, 90, generator=g).abs()
    rows[:, 10:40:3] = 0.5  # ties spread over several tensors
    rows[2] = 0.0  # an all-zero expert
    parts = pieces(rows, [20, 30, 1, 39])
    for k in [0, 1, 30, 55, 80, 90]:
        (cut,) = stream_topk_cuts(as_stream(parts), lambda d, k=k: [k])
        got = torch.cat([topk_mask(p, cut.threshold, cut.quota_for(n)) for n, p in parts], 1)
        ref_cut = topk_cut(rows, k)
        ref = topk_mask(rows, ref_cut.threshold, ref_cut.quota)
        assert torch.equal(got, ref), k
        assert got.sum(1).tolist() == [k, k, k]


def test_stream_cut_without_partial_ties_needs_no_tensor_quotas() -> None:
    rows = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    parts = pieces(rows, [3, 3])
    (cut,) = stream_topk_cuts(as_stream(parts), lambda d: [2])
    assert cut.tensor_quota == {}
    assert cut.quota.tolist() == [ALL_TIES, ALL_TIES]
    assert cut.threshold.tolist() == [4.0, 10.0]


def test_cut_globals_round_trip_and_missing_tensor() -> None:
    rows = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    parts = pieces(rows, [2, 2])
    (cut,) = stream_topk_cuts(as_stream(parts), lambda d: [3])
    back = TopKCut.from_globals(cut.to_globals("trim"), "trim")
    assert back.quota_for("t0").tolist() == [2] and back.quota_for("t1").tolist() == [1]
    with pytest.raises(ValueError, match="not in the stream"):
        back.quota_for("other")
    with pytest.raises(ValueError, match="prepare"):
        TopKCut.from_globals({}, "trim")


def _same(a, b) -> None:
    assert torch.equal(a.values, b.values)
    assert torch.equal(a.n_below, b.n_below)
    assert torch.equal(a.n_equal, b.n_equal)


@pytest.mark.parametrize("ties", [False, True])
def test_large_inputs_use_the_sampled_bracket_with_the_same_answer(monkeypatch: pytest.MonkeyPatch, ties: bool) -> None:
    import guardmerge.methods.fast.selection as selection

    g = torch.Generator().manual_seed(5)
    rows = torch.randn(3, 5000, generator=g)
    if ties:  # bfloat16-like: few distinct magnitudes, long runs of equal values
        rows = (rows * 4).round() / 4
        rows[:, 100:900] = -0.5
    ranks = [1, 150, 2500, 4001, 5000]
    small = kth_smallest(rows, ranks, absolute=True)
    monkeypatch.setattr(selection, "_SMALL", 0)
    monkeypatch.setattr(selection, "_SAMPLE", 256)  # a real sample (256 of 5000), in runs of 8
    monkeypatch.setattr(selection, "_SAMPLE_BLOCK", 8)
    bracketed = selection._bracketed_kth(rows.abs(), ranks)
    assert bracketed is not None  # the bracket held: the sampled path answered
    _same(bracketed, small)
    _same(kth_smallest(rows, ranks, absolute=True), small)
    monkeypatch.setattr(selection, "_SAMPLE_SIGMAS", 0.0)  # a bracket too narrow to hold
    _same(kth_smallest(rows, ranks, absolute=True), small)  # exact anyway (radix fallback)


def test_radix_fallback_gives_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    import guardmerge.methods.fast.selection as selection

    g = torch.Generator().manual_seed(5)
    rows = torch.randn(3, 500, generator=g)
    rows[:, 100:200] = -0.5
    ranks = [1, 150, 499]
    small = kth_smallest(rows, ranks, absolute=True)
    monkeypatch.setattr(selection, "_SMALL", 0)
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 37)  # many ragged chunks
    monkeypatch.setattr(selection, "_bracketed_kth", lambda *args: None)  # a missed bracket
    _same(kth_smallest(rows, ranks, absolute=True), small)


def test_masks_over_chunks_split_ties_in_flat_order(monkeypatch: pytest.MonkeyPatch) -> None:
    import guardmerge.methods.fast.selection as selection

    rows = torch.tensor([[2.0, 1.0, 2.0, 2.0, 0.5, 2.0, 2.0]])
    cut = topk_cut(rows, 4)  # threshold 2, quota 4 of the five 2s
    whole = topk_mask(rows, cut.threshold, cut.quota)
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 2)
    assert torch.equal(topk_mask(rows, cut.threshold, cut.quota), whole)
    assert whole.tolist() == [[True, False, True, True, False, True, False]]
