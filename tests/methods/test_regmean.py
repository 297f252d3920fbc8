"""RegMean: exact joint least squares, invariants from docs/algorithms.md 4, numerics."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from guardmerge.errors import ConfigError, StatisticsError
from guardmerge.methods import METHODS, Role, TensorContext, reference
from guardmerge.methods.regmean import regmean_merge

NAME = "encoder.layer.0.output.dense.weight"


def run(
    deltas: torch.Tensor, weights: list[float], grams: torch.Tensor | None = None, name: str = NAME, **params: object
) -> torch.Tensor:
    spec = METHODS.get("regmean")
    stats = {} if grams is None else {"gram": grams}
    ctx = TensorContext(name=name, role=Role.LINEAR_WEIGHT, stats=stats)
    return spec.fn(deltas, torch.tensor(weights, dtype=deltas.dtype), spec.validate(params), ctx)


def mean_gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def test_registered_with_schema_and_needs() -> None:
    spec = METHODS.get("regmean")
    assert spec.needs == frozenset({"gram"})
    p = spec.validate({})
    assert (p.alpha, p.ridge, p.scaling) == (1.0, 1e-6, 1.0)
    for bad in ({"alpha": 1.5}, {"alpha": -0.1}, {"ridge": -1.0}, {"lambda": 1.0}):
        with pytest.raises(ConfigError):
            spec.validate(bad)


def test_toy_linear_regression_equals_joint_least_squares() -> None:
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, sizes = 5, 3, (40, 25, 60)
    w0 = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    xs = [torch.randn(n, d_in, generator=gen, dtype=torch.float64) * (1 + i) for i, n in enumerate(sizes)]
    ws = [w0 + torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) for _ in sizes]
    # expert i fits its own data exactly: Y_i = X_i W_i^T; the joint least-squares W over all data
    x_all = torch.cat(xs).numpy()
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws)]).numpy()
    joint = np.linalg.lstsq(x_all, y_all, rcond=None)[0].T  # [out, in]
    deltas = torch.stack([w - w0 for w in ws])
    grams = torch.stack([mean_gram(x) for x in xs])  # means: weight expert i by its size
    merged = w0 + run(deltas, list(map(float, sizes)), grams)
    np.testing.assert_allclose(merged.numpy(), joint, rtol=1e-10, atol=1e-10)


def test_identical_grams_give_the_weighted_average() -> None:
    gen = torch.Generator().manual_seed(1)
    deltas = torch.randn(3, 4, 6, generator=gen)
    x = torch.randn(50, 6, generator=gen)
    grams = mean_gram(x).expand(3, 6, 6)
    weights = [1.0, 2.0, 0.5]
    expected = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    torch.testing.assert_close(run(deltas, weights, grams), expected, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_the_per_column_weighted_mean() -> None:
    gen = torch.Generator().manual_seed(2)
    deltas = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    grams = torch.stack([mean_gram(torch.randn(30, 4, generator=gen, dtype=torch.float64)) for _ in range(2)])
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)
    diag = torch.diagonal(grams, dim1=1, dim2=2) * weights[:, None]  # [N, in]
    expected = (deltas * diag[:, None, :]).sum(0) / diag.sum(0)[None, :]
    torch.testing.assert_close(run(deltas, [1.0, 3.0], grams, alpha=0.0), expected)


def test_one_expert_returns_itself_and_scaling_applies() -> None:
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(1, 4, 6, generator=gen)
    gram = mean_gram(torch.randn(20, 6, generator=gen))[None]
    torch.testing.assert_close(run(delta, [0.7], gram), delta[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(delta, [1.0], gram, alpha=0.3), delta[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(delta, [1.0], gram, scaling=0.5), 0.5 * delta[0], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(run(delta, [1.0], gram, scaling=0.0)) == 0


def test_weights_scale_the_grams() -> None:
    gen = torch.Generator().manual_seed(4)
    deltas = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    grams = torch.stack([mean_gram(torch.randn(30, 5, generator=gen, dtype=torch.float64)) for _ in range(2)])
    scaled = torch.stack([2.0 * grams[0], grams[1]])
    torch.testing.assert_close(run(deltas, [2.0, 1.0], grams), run(deltas, [1.0, 1.0], scaled))
    # overall scale of the weights does not matter
    torch.testing.assert_close(run(deltas, [2.0, 1.0], grams), run(deltas, [4.0, 2.0], grams))


def test_tensors_without_gram_get_the_weighted_average() -> None:
    deltas = torch.tensor([[1.0, 2.0], [5.0, -2.0]])
    out = run(deltas, [1.0, 3.0], None, name="encoder.layer.0.output.dense.bias", scaling=2.0)
    assert torch.equal(out, torch.tensor([8.0, -2.0]))
    with pytest.raises(ValueError, match="sum to 0"):
        run(deltas, [1.0, -1.0], None)


def test_singular_gram_falls_back_to_ridge(caplog: pytest.LogCaptureFixture) -> None:
    gen = torch.Generator().manual_seed(5)
    d_in = 8
    xs = [torch.randn(3, d_in, generator=gen, dtype=torch.float64) for _ in range(2)]  # rank 3+3
    grams = torch.stack([mean_gram(x) for x in xs])
    deltas = torch.randn(2, 4, d_in, generator=gen, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="guardmerge.methods.regmean"):
        merged = run(deltas, [1.0, 1.0], grams)
    assert "ridge" in caplog.text
    assert torch.isfinite(merged).all()
    assert merged.abs().max() < 10 * deltas.abs().max()  # no blow-up in the null space
    # on the data it is (nearly) the exact RegMean fit: residual of the normal equations ~ 0
    a = grams.sum(0)
    b = torch.einsum("noi,nij->oj", deltas, grams)
    assert (merged @ a - b).abs().max() < 1e-4 * b.abs().max()
    # one expert with a singular Gram still returns itself on the data's span
    one = run(deltas[:1], [1.0], grams[:1])
    torch.testing.assert_close(xs[0] @ one.T, xs[0] @ deltas[0].T, rtol=1e-4, atol=1e-4)


def test_all_zero_gram_gives_the_weighted_average() -> None:
    deltas = torch.randn(2, 3, 4, dtype=torch.float64)
    merged = run(deltas, [1.0, 3.0], torch.zeros(2, 4, 4, dtype=torch.float64))
    torch.testing.assert_close(merged, (deltas[0] + 3 * deltas[1]) / 4)


def test_rank_deficient_sum_without_ridge_is_the_least_squares_solution() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    grams = mean_gram(x).expand(2, 5, 5).clone()
    deltas = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    merged = run(deltas, [1.0, 1.0], grams, ridge=0.0)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(x @ merged.T, x @ deltas.mean(0).T)


def test_shape_mismatch_is_a_statistics_error() -> None:
    with pytest.raises(StatisticsError, match="does not match"):
        run(torch.randn(2, 3, 4), [1.0, 1.0], torch.eye(5).expand(2, 5, 5))


def test_merging_weights_or_deltas_agree() -> None:
    """theta_0 cancels: RegMean(theta_i) = theta_0 + RegMean(tau_i)."""
    gen = torch.Generator().manual_seed(6)
    w0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    taus = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    grams = torch.stack([mean_gram(torch.randn(20, 5, generator=gen, dtype=torch.float64)) for _ in range(2)])
    ones = torch.ones(2, dtype=torch.float64)
    full = regmean_merge(w0 + taus, grams, ones)
    torch.testing.assert_close(full, w0 + regmean_merge(taus, grams, ones))


@pytest.mark.parametrize("alpha", [1.0, 0.4, 0.0])
def test_equals_the_reference(alpha: float) -> None:
    gen = torch.Generator().manual_seed(8)
    deltas = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    grams = torch.stack([mean_gram(torch.randn(20, 6, generator=gen, dtype=torch.float64)) for _ in range(3)])
    want = reference.regmean(deltas, grams, torch.tensor([1.0, 2.0, 0.5]), alpha=alpha)
    torch.testing.assert_close(run(deltas, [1.0, 2.0, 0.5], grams, alpha=alpha), want, rtol=1e-10, atol=1e-12)
