"""The chunked magnitude trim, breadcrumbs window and DARE: hand-checked tensors, chunking, and
the whole-tensor reference."""

from __future__ import annotations

import pytest
import torch

from guardmerge.methods import reference
from guardmerge.methods.fast.selection import TopKCut, as_rows, topk_mask
from guardmerge.methods.fast.sparsify import (
    ChunkDare,
    RescaleBy,
    apply_chunks,
    breadcrumbs_counts,
    breadcrumbs_cuts,
    chunk_trim,
    chunk_window,
    expert_generators,
    kept_count,
    magnitude_cut,
)
from guardmerge.methods.registry import Role, TensorContext


def cut_mask(deltas: torch.Tensor, cut: TopKCut, name: str = "") -> torch.Tensor:
    """Bool ``[N, *shape]``: the entries of ``|deltas|`` that ``cut`` keeps (the whole tensor at once)."""
    return topk_mask(as_rows(deltas), cut.threshold, cut.quota_for(name), absolute=True).view(deltas.shape)


def window_mask(deltas: torch.Tensor, outer: TopKCut, inner: TopKCut) -> torch.Tensor:
    """Bool ``[N, *shape]``: kept by ``inner`` (top ``n_top + n_keep``), not by ``outer``."""
    return cut_mask(deltas, inner) & ~cut_mask(deltas, outer)


def dare(
    deltas: torch.Tensor,
    density: float,
    generator: torch.Generator,
    rescale: bool = True,
    rescale_by: RescaleBy = "density",
) -> torch.Tensor:
    """The chunked DARE over a whole tensor ``[N, *shape]``."""
    return apply_chunks(deltas, ChunkDare(deltas, density, generator, rescale, rescale_by))


def test_magnitude_trim_golden() -> None:
    tau = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.5, 1.0, 0.25, -0.5]])
    mask = cut_mask(tau, magnitude_cut(tau, 0.5))
    assert (tau * mask).tolist() == [[0.0, -2.0, 0.0, 3.0], [-1.5, 1.0, 0.0, 0.0]]


def test_magnitude_tie_keeps_lower_flat_index() -> None:
    tau = torch.tensor([[1.0, -3.0, 3.0, 2.0, -3.0]])  # three |3| tie for 2 places
    mask = cut_mask(tau, magnitude_cut(tau, 0.4))
    assert mask.tolist() == [[False, True, True, False, False]]
    tau2d = tau.reshape(1, 5, 1)  # flat order is row-major whatever the shape
    assert cut_mask(tau2d, magnitude_cut(tau2d, 0.4)).reshape(1, 5).tolist() == mask.tolist()


def test_magnitude_counts() -> None:
    assert kept_count(10, 0.2) == 2
    assert kept_count(3, 0.2) == 0  # floor: a 3-entry tensor keeps nothing at density 0.2
    tau = torch.ones(2, 3)
    assert not cut_mask(tau, magnitude_cut(tau, 0.2)).any()
    assert cut_mask(tau, magnitude_cut(tau, 1.0)).all()


def test_breadcrumbs_window_golden() -> None:
    tau = torch.tensor([[0.1, -0.5, 0.3, -0.9, 0.7, 0.2, -0.4, 0.05, 0.6, -0.8]])
    assert breadcrumbs_counts(10, 0.3, 0.1) == (1, 4)
    outer, inner = breadcrumbs_cuts(tau, 0.3, 0.1)
    kept = tau * window_mask(tau, outer, inner)
    expected = [[0.0, 0.0, 0.0, 0.0, 0.7, 0.0, 0.0, 0.0, 0.6, -0.8]]
    assert torch.equal(kept, torch.tensor(expected))


def test_breadcrumbs_density_wins_over_gamma() -> None:
    assert breadcrumbs_counts(10, 1.0, 0.1) == (0, 10)
    assert breadcrumbs_counts(10, 0.95, 0.1) == (1, 10)  # keeps floor(9.5) = 9 below the top 1
    assert breadcrumbs_counts(100, 0.95, 0.1) == (5, 100)  # only 5 of the top 10 can go
    assert breadcrumbs_counts(100, 0.9, 0.05) == (5, 95)
    tau = torch.randn(2, 10)
    outer, inner = breadcrumbs_cuts(tau, 1.0, 0.1)
    assert window_mask(tau, outer, inner).all()


def test_breadcrumbs_with_gamma_zero_is_magnitude_trim() -> None:
    tau = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    outer, inner = breadcrumbs_cuts(tau, 0.25, 0.0)
    assert torch.equal(window_mask(tau, outer, inner), cut_mask(tau, magnitude_cut(tau, 0.25)))


def test_breadcrumbs_tie_at_the_top_breaks_by_index() -> None:
    tau = torch.tensor([[4.0, -4.0, 1.0, 2.0, 3.0]])  # n_top = 1 of the two |4|
    outer, inner = breadcrumbs_cuts(tau, 0.4, 0.2)  # keep 2 after dropping 1
    assert window_mask(tau, outer, inner).tolist() == [[False, True, False, False, True]]


def ctx(name: str = "encoder.layer.0.attention.self.query.weight") -> TensorContext:
    return TensorContext(name, Role.LINEAR_WEIGHT)


def test_dare_golden_given_the_draws() -> None:
    tau = torch.tensor([[1.0, -2.0, 3.0, 4.0], [0.5, 0.5, -0.5, 0.5]])
    gens = expert_generators(ctx().generator(7), 2)  # one generator per expert
    keep = torch.stack([torch.rand(4, generator=g) < 0.5 for g in gens])
    out = dare(tau, 0.5, ctx().generator(7), rescale=True)
    assert torch.equal(out, tau * keep * 2.0)
    out_plain = dare(tau, 0.5, ctx().generator(7), rescale=False)
    assert torch.equal(out_plain, tau * keep)


def test_dare_draws_do_not_depend_on_chunking_or_later_experts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import guardmerge.methods.fast.selection as selection

    tau = torch.randn(3, 50)
    whole = dare(tau, 0.4, ctx().generator(3))
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 7)  # chunks of 2 columns
    assert torch.equal(dare(tau, 0.4, ctx().generator(3)), whole)
    assert torch.equal(dare(tau[:2], 0.4, ctx().generator(3)), whole[:2])


def test_dare_deterministic_per_seed_and_name() -> None:
    tau = torch.randn(3, 64)
    a = dare(tau, 0.5, ctx().generator(1))
    assert torch.equal(a, dare(tau, 0.5, ctx().generator(1)))
    assert not torch.equal(a, dare(tau, 0.5, ctx().generator(2)))
    assert not torch.equal(a, dare(tau, 0.5, ctx("pooler.dense.weight").generator(1)))


def test_chunked_steps_equal_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    import guardmerge.methods.fast.selection as selection

    g = torch.Generator().manual_seed(8)
    tau = torch.round(torch.randn(3, 6, 50, generator=g) * 8) / 8  # many ties at every cut
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 3 * 7)  # ragged chunks of 7 columns
    for density in (0.1, 0.37, 1.0):
        trimmed = apply_chunks(tau, chunk_trim(magnitude_cut(tau, density)))
        assert torch.equal(trimmed, reference.trim(tau, density))
        crumbs = apply_chunks(tau, chunk_window(*breadcrumbs_cuts(tau, density, 0.05)))
        assert torch.equal(crumbs, tau * reference.breadcrumbs_mask(tau, density, 0.05))
    for rescale_by in ("density", "l1"):
        ours = dare(tau, 0.3, ctx().generator(4), rescale_by=rescale_by)  # type: ignore[arg-type]
        theirs = reference.dare(tau, 0.3, ctx().generator(4), rescale_by=rescale_by)  # type: ignore[arg-type]
        assert torch.equal(ours != 0, theirs != 0)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_dare_density_one_is_identity() -> None:
    tau = torch.randn(2, 5)
    assert torch.equal(dare(tau, 1.0, ctx().generator(0)), tau)


def test_dare_rescale_preserves_the_sum_in_expectation() -> None:
    tau = torch.ones(1, 200_000)
    out = dare(tau, 0.3, ctx().generator(3))
    kept = (out != 0).float().mean()
    assert float(kept) == pytest.approx(0.3, abs=0.005)
    assert float(out.sum()) == pytest.approx(float(tau.sum()), rel=0.02)
    values = out.unique()
    assert values.numel() == 2 and values[0] == 0.0
    assert float(values[1]) == pytest.approx(1 / 0.3)


def test_dare_l1_rescale_keeps_each_experts_l1_norm() -> None:
    tau = torch.tensor([[1.0, -2.0, 3.0, 4.0] * 5, [0.0] * 20, [1.0, 1.0, 1.0, 1.0] * 5])
    out = dare(tau, 0.5, ctx().generator(1), rescale_by="l1")
    plain = dare(tau, 0.5, ctx().generator(1), rescale=False)
    assert torch.equal(out != 0, plain != 0)  # same draws
    assert torch.allclose(out.abs().sum(1), tau.abs().sum(1))  # norms kept (row 2 stays 0)


def test_parallel_dare_draws_equal_the_serial_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    import guardmerge.methods.fast.sparsify as sparsify

    def draws() -> torch.Tensor:
        gens = sparsify.expert_generators(torch.Generator().manual_seed(3), 3)
        return sparsify.dare_keep(gens, 0, 5000, 0.3)

    monkeypatch.setattr(sparsify, "_PARALLEL_DRAW", 1)  # one thread per expert
    parallel = draws()
    monkeypatch.setattr(sparsify, "_PARALLEL_DRAW", 10**9)  # one after the other
    serial = draws()
    assert torch.equal(parallel, serial)
    assert 0.25 < parallel.float().mean() < 0.35
