"""The fused numba kernels (methods/fast/kernels.py) give bit for bit what the chunked torch code and the
whole-tensor reference give."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from guardmerge.methods import METHODS, reference
from guardmerge.methods.fast import kernels
from guardmerge.methods.fast.selection import ALL_TIES, kth_smallest, tie_cutoffs
from guardmerge.methods.registry import Role, TensorContext

pytest.importorskip("numba")

NAME = "encoder.layer.0.output.dense.weight"


def _merge(method: str, deltas: torch.Tensor, weights: torch.Tensor, **raw: Any) -> torch.Tensor:
    spec = METHODS.get(method)
    ctx = TensorContext(NAME, Role.LINEAR_WEIGHT, seed=3)
    return spec.fn(deltas.clone(), weights, spec.validate(raw), ctx)


def _both(monkeypatch: pytest.MonkeyPatch, fn: Any) -> tuple[Any, Any]:
    """``fn()`` with the kernels, then with the chunked torch code."""
    monkeypatch.delenv("GUARDMERGE_KERNELS", raising=False)
    assert kernels.enabled()
    fused = fn()
    monkeypatch.setenv("GUARDMERGE_KERNELS", "torch")
    assert not kernels.enabled()
    chunked = fn()
    monkeypatch.delenv("GUARDMERGE_KERNELS")
    return fused, chunked


def _task_vectors(cols: int, seed: int = 0) -> torch.Tensor:
    """``[3, 40, cols]`` with the awkward cases: quantised values (ties at any threshold),
    exact zeros, and columns that sum to exactly 0 after weighting."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(3, 40, cols, generator=g) * 0.01
    d[:, :10] = torch.round(d[:, :10] * 200) / 200  # few distinct magnitudes
    d[:, 10:12] = 0.0
    d[1, 12] = -d[0, 12]  # cancels when the weights are equal
    d[2, 12] = 0.0
    return d


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("ties", {"density": 0.2, "scope": "per_tensor", "scaling": 0.7}),
        ("ties", {"density": 0.5, "scope": "per_tensor", "consensus": "sum"}),
        ("ties", {"density": 0.9, "scope": "per_tensor"}),
        ("dare_ties", {"density": 0.3, "rescale_by": "l1", "scaling": 1.3}),
        ("dare_ties", {"density": 0.3, "consensus": "sum"}),
        ("dare_ties", {"density": 0.6, "rescale": False}),
        ("dare_ties", {"density": 1.0}),
    ],
)
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 0.5, 0.21]])
def test_fused_merge_is_bit_identical_to_the_chunked_code(
    monkeypatch: pytest.MonkeyPatch, method: str, raw: dict[str, Any], weights: list[float]
) -> None:
    deltas = _task_vectors(700)
    w = torch.tensor(weights)
    fused, chunked = _both(monkeypatch, lambda: _merge(method, deltas, w, **raw))
    assert torch.equal(fused, chunked)
    assert fused.shape == deltas.shape[1:]


def test_negative_mass_patches_the_zero_sum_columns_like_the_chunked_code(monkeypatch: pytest.MonkeyPatch) -> None:
    # mostly negative entries (the mass is negative) and a column of +x, -x, 0: its sum is 0,
    # the election falls back to '-', the disjoint mean keeps the -x
    deltas = -torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    deltas[:, 5, 7] = torch.tensor([0.9, -0.9, 0.0])
    fused, chunked = _both(monkeypatch, lambda: _merge("ties", deltas, torch.ones(3), density=1.0, scope="per_tensor"))
    assert torch.equal(fused, chunked)
    assert fused[5, 7].item() == pytest.approx(-0.9)


def test_global_scope_uses_the_kernel_with_the_prepared_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = {f"layer.{i}.weight": _task_vectors(300, seed=i) for i in range(3)}
    spec = METHODS.get("ties")
    params = spec.validate({"density": 0.3})
    assert spec.prepare is not None
    found = spec.prepare(params, lambda: ((TensorContext(n, Role.LINEAR_WEIGHT), t) for n, t in tensors.items()))

    def merged() -> list[torch.Tensor]:
        return [
            spec.fn(t, torch.ones(3), params, TensorContext(n, Role.LINEAR_WEIGHT, globals=found))
            for n, t in tensors.items()
        ]

    fused, chunked = _both(monkeypatch, merged)
    for got, want in zip(fused, chunked):
        assert torch.equal(got, want)


@pytest.mark.parametrize("consensus", ["mean", "sum"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_fused_ties_and_dare_ties_equal_the_whole_tensor_reference(
    monkeypatch: pytest.MonkeyPatch, consensus: str, density: float
) -> None:
    monkeypatch.delenv("GUARDMERGE_KERNELS", raising=False)
    deltas, w = _task_vectors(700), torch.tensor([0.3, 0.5, 0.21])
    got = _merge("ties", deltas, w, density=density, scope="per_tensor", consensus=consensus, scaling=0.7)
    assert torch.equal(got, reference.ties(deltas, w, density, 0.7, consensus))  # type: ignore[arg-type]
    got = _merge("dare_ties", deltas, w, density=density, consensus=consensus, rescale_by="l1")
    dropped = reference.dare(
        deltas, density, TensorContext(NAME, Role.LINEAR_WEIGHT, seed=3).generator(), rescale_by="l1"
    )
    assert torch.equal(got, reference.ties_consensus(dropped, w, consensus))  # type: ignore[arg-type]


def test_dare_draws_are_the_same_with_and_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    deltas = torch.ones(3, 50, 200)  # every kept entry shows up in the merged sum
    fused, chunked = _both(
        monkeypatch, lambda: _merge("dare_ties", deltas, torch.ones(3), density=0.3, rescale=False, consensus="sum")
    )
    assert torch.equal(fused, chunked)
    assert 0 < fused.count_nonzero() < fused.numel()


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_kth_smallest_through_the_band_kernel(monkeypatch: pytest.MonkeyPatch, absolute: bool, ties: bool) -> None:
    from guardmerge.methods.fast import selection

    monkeypatch.delenv("GUARDMERGE_KERNELS", raising=False)
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(3, 300_001, generator=g)  # wide enough for the sample and two threads
    if ties:
        rows = torch.round(rows * 8) / 8
    ranks = [1, 1000, 150_000, 299_999, 300_001]
    want = (rows.abs() if absolute else rows).sort(dim=1).values[:, [k - 1 for k in ranks]]
    monkeypatch.setattr(selection, "_SMALL", 0)
    got = selection._bracketed_kth(rows, ranks, absolute)
    assert got is not None
    assert torch.equal(got.values, want)
    monkeypatch.setenv("GUARDMERGE_KERNELS", "torch")
    chunked = kth_smallest(rows, ranks, absolute)
    assert torch.equal(got.values, chunked.values)
    assert torch.equal(got.n_below, chunked.n_below)
    assert torch.equal(got.n_equal, chunked.n_equal)


def test_band_overflow_returns_none_and_selection_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    from guardmerge.methods.fast import selection

    monkeypatch.delenv("GUARDMERGE_KERNELS", raising=False)
    row = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    counted = kernels.band(row, -1.0, 1.0, False, expected=10)  # ~68% of the row, not ~10 values
    assert counted is None
    below, band = kernels.band(row, -1.0, 1.0, False, expected=150_000)
    assert below == int((row < -1.0).sum())
    assert torch.equal(band.sort().values, row[(row >= -1.0) & (row <= 1.0)].sort().values)
    monkeypatch.setattr(kernels, "_BAND_SLACK", 0)  # every band overflows: the torch band answers
    monkeypatch.setattr(kernels, "_BAND_MIN", 4)
    monkeypatch.setattr(selection, "_SMALL", 0)
    rows = row.view(2, -1)
    got = kth_smallest(rows, [5, 50_000], absolute=True)
    want = rows.abs().sort(dim=1).values[:, [4, 49_999]]
    assert torch.equal(got.values, want)


def test_tie_cutoffs_keep_the_first_quota_ties() -> None:
    rows = torch.tensor([[2.0, -1.0, -2.0, 2.0, 0.5, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    threshold = torch.tensor([2.0, 1.0])
    for use_kernel in (True, False):
        quota = torch.tensor([2, ALL_TIES]) if use_kernel else torch.tensor([0, 4])
        got = tie_cutoffs(rows, threshold, quota)
        # row 0, quota 2: ties at 0, 2, 3, 5 -> the third (index 3) is the first dropped
        assert got.tolist() == ([3, 6] if use_kernel else [0, 4])
    assert kernels.nth_tie(rows[0], 2.0, 3) == 5
    assert kernels.nth_tie(rows[0], 2.0, 4) == 6  # fewer ties than asked: the row's length


def test_l1_norms_match_float64_sums_and_ignore_the_thread_count() -> None:
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(3, 100_003, generator=g)
    keep = torch.rand(3, 100_003, generator=g) < 0.3
    before, after = kernels.l1_norms(rows, keep, block=4096)
    assert torch.allclose(before, rows.double().abs().sum(1), rtol=1e-12, atol=0)
    assert torch.allclose(after, (rows.double().abs() * keep).sum(1), rtol=1e-12, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = kernels.l1_norms(rows, keep, block=4096)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(again[0], before) and torch.equal(again[1], after)


def test_environment_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDMERGE_KERNELS", "torch")
    assert not kernels.enabled()
    monkeypatch.setenv("GUARDMERGE_KERNELS", "")
    assert kernels.enabled()


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
@pytest.mark.parametrize("density", [0.2, 0.9])
def test_draw_keep_reproduces_torch_rand_and_leaves_the_same_stream(seed: int, density: float) -> None:
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    torch.rand(5, generator=ours), torch.rand(5, generator=theirs)  # start mid-block
    for count in (0, 1, 618, 624, 625, 5000):  # across the engine's 624-value twists
        got = kernels.draw_keep(ours, count, density)
        assert got is not None
        assert torch.equal(got, torch.rand(count, generator=theirs) < density)
    assert torch.equal(torch.rand(100, generator=ours), torch.rand(100, generator=theirs))


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "signed_zeros"])
def test_kth_counts_matches_a_sort(kind: str) -> None:
    g = torch.Generator().manual_seed(len(kind))
    for size in (1, 2, 37, 5000):
        x = torch.randn(size, generator=g)
        if kind == "ties":
            x = torch.round(x * 4) / 4
        elif kind == "zeros":
            x = x.abs()
            x[: size // 3] = 0.0
        elif kind == "signed_zeros":
            x = torch.round(x * 2) / 2
            x[torch.rand(size, generator=g) < 0.3] = -0.0
        ordered = x.sort().values
        for k in {1, (size + 1) // 2, size}:
            v, below, equal = kernels.kth_counts(x, k)
            assert v == ordered[k - 1].item()
            assert below == int((x < v).sum()) and equal == int((x == v).sum())


@pytest.fixture
def kernel_threads(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Four torch threads (the suite pins one) and a fresh kernel pool sized for them; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    kernels._pool.cache_clear()
    used: list[int] = []
    real_map = kernels._map
    monkeypatch.setattr(kernels, "_map", lambda fn, items: (used.append(len(items)), real_map(fn, items))[1])
    try:
        yield used
    finally:
        kernels._pool().shutdown(wait=True)
        kernels._pool.cache_clear()
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("ties", {"density": 0.3, "scope": "per_tensor", "scaling": 0.7}),
        ("ties", {"density": 1.0, "scope": "per_tensor", "consensus": "sum"}),
        ("dare_ties", {"density": 0.4, "rescale_by": "l1", "scaling": 1.3}),
    ],
)
def test_threaded_split_is_bit_identical_to_one_thread_and_the_chunked_code(
    monkeypatch: pytest.MonkeyPatch, kernel_threads: list[int], method: str, raw: dict[str, Any]
) -> None:
    deltas = _task_vectors(5000, seed=5)  # 200,000 columns: three spans of >= 65,536 on four threads
    assert len(kernels._spans(deltas[0].numel())) == 3
    w = torch.tensor([0.3, 0.5, 0.21])
    fused, chunked = _both(monkeypatch, lambda: _merge(method, deltas, w, **raw))
    assert max(kernel_threads) >= 3  # the column spans really ran as separate parts
    torch.set_num_threads(1)
    single = _merge(method, deltas, w, **raw)
    assert torch.equal(fused, chunked)
    assert torch.equal(fused, single)


def test_threaded_band_matches_one_thread(kernel_threads: list[int]) -> None:
    row = torch.randn(300_001, generator=torch.Generator().manual_seed(9))
    got = kernels.band(row, 0.2, 0.7, True, expected=120_000)
    assert max(kernel_threads) == 4
    torch.set_num_threads(1)
    one = kernels.band(row, 0.2, 0.7, True, expected=120_000)
    assert got is not None and one is not None
    (below, band), (below1, band1) = got, one
    assert below == below1 == int((row.abs() < 0.2).sum())
    assert torch.equal(band.sort().values, band1.sort().values)
    assert torch.equal(band.sort().values, row.abs()[(row.abs() >= 0.2) & (row.abs() <= 0.7)].sort().values)
