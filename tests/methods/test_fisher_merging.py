"""Fisher merging: invariants, the whole-tensor reference, the optional global normalisation (prepare pass)."""

from __future__ import annotations

import pytest
import torch

from guardmerge.errors import StatisticsError
from guardmerge.methods import METHODS, Role, TensorContext, reference


def run(
    deltas: torch.Tensor,
    weights: list[float],
    fisher: torch.Tensor | None,
    globals_: dict[str, torch.Tensor] | None = None,
    **params: object,
) -> torch.Tensor:
    spec = METHODS.get("fisher")
    ctx = TensorContext(
        name="encoder.x.weight",
        role=Role.LINEAR_WEIGHT,
        stats={} if fisher is None else {"fisher": fisher},
        globals=globals_ or {},
    )
    return spec.fn(deltas, torch.tensor(weights, dtype=deltas.dtype), spec.validate(params), ctx)


def prepare(tensors: list[tuple[torch.Tensor, torch.Tensor]], **params: object):
    spec = METHODS.get("fisher")

    def stream():
        for i, (d, f) in enumerate(tensors):
            yield TensorContext(name=f"t{i}", role=Role.OTHER, stats={"fisher": f}), d

    return spec.prepare(spec.validate(params), stream)


def test_registered_with_schema_and_needs() -> None:
    spec = METHODS.get("fisher")
    assert spec.needs == frozenset({"fisher"}) and spec.prepare is not None
    p = spec.validate({})
    assert (p.eps, p.normalize, p.scaling) == (1e-6, False, 1.0)


def test_equal_fishers_give_the_weighted_average() -> None:
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 4, 5, generator=gen)
    fisher = torch.rand(4, 5, generator=gen).expand(3, 4, 5)
    weights = [1.0, 2.0, 1.0]
    expected = sum(w * d for w, d in zip(weights, deltas)) / 4.0
    torch.testing.assert_close(run(deltas, weights, fisher), expected)


def test_one_expert_returns_itself() -> None:
    d = torch.randn(1, 3, 4)
    torch.testing.assert_close(run(d, [0.3], torch.rand(1, 3, 4)), d[0])
    torch.testing.assert_close(run(d, [1.0], torch.rand(1, 3, 4), scaling=2.0), 2 * d[0])


def test_matches_the_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    deltas = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    fisher = torch.rand(2, 6, generator=gen, dtype=torch.float64)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)[:, None]
    expected = (w * (fisher + 1e-6) * deltas).sum(0) / (w * (fisher + 1e-6)).sum(0)
    torch.testing.assert_close(run(deltas, [1.0, 3.0], fisher), expected)


def test_zero_fisher_without_eps_falls_back_to_the_average() -> None:
    deltas = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    fisher = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    out = run(deltas, [1.0, 1.0], fisher, eps=0.0)
    assert torch.equal(out, torch.tensor([2.0, 2.0]))


def test_no_fisher_gives_the_weighted_average() -> None:
    deltas = torch.tensor([[1.0, 2.0], [5.0, -2.0]])
    assert torch.equal(run(deltas, [1.0, 3.0], None), torch.tensor([4.0, -1.0]))


def test_normalize_makes_each_expert_scale_free() -> None:
    gen = torch.Generator().manual_seed(2)
    tensors = [
        (torch.randn(2, 3, generator=gen), torch.rand(2, 3, generator=gen)),
        (torch.randn(2, 4, generator=gen), torch.rand(2, 4, generator=gen)),
    ]
    assert prepare(tensors) == {}  # nothing read without normalize
    norms = prepare(tensors, normalize=True)["fisher_norm"]
    expected = torch.sqrt(sum((f.double() ** 2).sum(1) for _, f in tensors))
    torch.testing.assert_close(norms, expected)
    # scaling one expert's Fisher by 1000 changes nothing once normalised
    scaled = [(d, f * torch.tensor([[1000.0], [1.0]])) for d, f in tensors]
    norms_scaled = prepare(scaled, normalize=True)["fisher_norm"]
    d, f = tensors[0]
    a = run(d, [1.0, 1.0], f, {"fisher_norm": norms}, normalize=True, eps=0.0)
    b = run(d, [1.0, 1.0], scaled[0][1], {"fisher_norm": norms_scaled}, normalize=True, eps=0.0)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(run(d, [1.0, 1.0], f, eps=0.0), run(d, [1.0, 1.0], scaled[0][1], eps=0.0))
    with pytest.raises(StatisticsError, match="prepare"):
        run(d, [1.0, 1.0], f, normalize=True)


def test_equals_the_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    deltas = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    fisher = torch.rand(3, 4, 5, generator=gen, dtype=torch.float64)
    want = reference.fisher(deltas, fisher, torch.tensor([1.0, 0.5, 2.0]), eps=1e-3)
    torch.testing.assert_close(run(deltas, [1.0, 0.5, 2.0], fisher, eps=1e-3), want)
