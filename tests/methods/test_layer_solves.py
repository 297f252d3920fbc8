"""The layer-wise solves as pure functions (docs/algorithms.md 3a): RegMean++ and cross-target LS."""

from __future__ import annotations

import pytest
import torch

from guardmerge.errors import ConfigError
from guardmerge.methods import METHODS, LinearSystem
from guardmerge.methods.layer_solves import LayerwiseParams, lot_solve, regmean_pp_solve
from guardmerge.methods.regmean import regmean_merge


def _params(**kw: object) -> LayerwiseParams:
    return LayerwiseParams(**kw)  # type: ignore[arg-type]


def _augment(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _system(
    grams: torch.Tensor,
    weights_i: torch.Tensor,
    biases_i: torch.Tensor | None = None,
    cross: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
    anchor_bias: torch.Tensor | None = None,
) -> LinearSystem:
    n, _out, _ = weights_i.shape
    return LinearSystem(
        name="layer.weight",
        gram=grams,
        cross=cross,
        expert_weight=weights_i,
        expert_bias=biases_i,
        anchor_weight=torch.zeros(weights_i.shape[1:], dtype=torch.float64) if anchor is None else anchor,
        anchor_bias=anchor_bias,
        weights=torch.ones(n, dtype=torch.float64) if w is None else w,
    )


def test_regmean_pp_on_expert_inputs_is_regmean() -> None:
    """With the experts' own Grams (the first layer), RegMean++'s solve is RegMean's."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(50, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = torch.stack([x.T @ x / len(x) for x in xs])
    theta0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    ws = theta0 + 0.1 * torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    for alpha in (1.0, 0.6):
        got, _ = regmean_pp_solve(_system(grams, ws, w=w), _params(alpha=alpha))
        want = theta0 + regmean_merge(ws - theta0, grams, w, alpha=alpha)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _joint_lstsq(xs_merged, ys, w) -> torch.Tensor:
    """min_[W b] sum_i w_i / n_i ||[X~_i 1][W b]^T - Y_i||^2 by lstsq on row-scaled stacked data."""
    rows, targets = [], []
    for x, y, wi in zip(xs_merged, ys, w):
        s = (float(wi) / len(x)) ** 0.5
        rows.append(s * _augment(x))
        targets.append(s * y)
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T  # [out, in+1]


def _lot_stats(xs_merged, ys):
    grams = torch.stack([_augment(x).T @ _augment(x) / len(x) for x in xs_merged])
    cross = torch.stack([y.T @ _augment(x) / len(x) for x, y in zip(xs_merged, ys)])
    return grams, cross


def test_lot_is_the_joint_least_squares_layer_by_layer() -> None:
    """A toy stack of two linear layers: each lot solve equals the joint least-squares fit of the
    merged inputs (pushed through the solved first layer) to the experts' own outputs."""
    g = torch.Generator().manual_seed(1)
    n_exp, d0, d1, d2 = 3, 5, 4, 3
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    layers = [
        (
            torch.randn(n_exp, d1, d0, generator=g, dtype=torch.float64),
            torch.randn(n_exp, d1, generator=g, dtype=torch.float64),
        ),
        (
            torch.randn(n_exp, d2, d1, generator=g, dtype=torch.float64),
            torch.randn(n_exp, d2, generator=g, dtype=torch.float64),
        ),
    ]
    inputs = [torch.randn(40 + 10 * i, d0, generator=g, dtype=torch.float64) for i in range(n_exp)]
    expert_in = list(inputs)  # each expert's own input to the current layer
    merged_in = [x + 0.3 for x in inputs]  # the merged model's (drifted) inputs
    for weight, bias in layers:
        ys = [expert_in[i] @ weight[i].T + bias[i] for i in range(n_exp)]
        grams, cross = _lot_stats(merged_in, ys)
        got_w, got_b = lot_solve(_system(grams, weight, bias, cross=cross, w=w), _params())
        want = _joint_lstsq(merged_in, ys, w)
        torch.testing.assert_close(got_w, want[:, :-1], rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(got_b, want[:, -1], rtol=1e-8, atol=1e-8)
        merged_in = [x @ got_w.T + got_b for x in merged_in]
        expert_in = ys


def test_lot_identical_experts_on_own_inputs_returns_them() -> None:
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    xs = [torch.randn(30, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    ys = [x @ weight.T + bias for x in xs]
    grams, cross = _lot_stats(xs, ys)
    got_w, got_b = lot_solve(_system(grams, weight.expand(2, 4, 6), bias.expand(2, 4), cross=cross), _params())
    torch.testing.assert_close(got_w, weight)
    torch.testing.assert_close(got_b, bias)


def test_rho_pulls_toward_the_anchor_and_zero_rho_ignores_it() -> None:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(30, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    ws = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    bs = torch.randn(2, 3, generator=g, dtype=torch.float64)
    ys = [x @ ws[i].T + bs[i] for i, x in enumerate(xs)]
    grams, cross = _lot_stats(xs, ys)
    anchor, anchor_b = (
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, generator=g, dtype=torch.float64),
    )
    system = _system(grams, ws, bs, cross=cross, anchor=anchor, anchor_bias=anchor_b)
    plain = lot_solve(system, _params())
    other = lot_solve(_system(grams, ws, bs, cross=cross, anchor=anchor * 7, anchor_bias=anchor_b), _params())
    torch.testing.assert_close(plain[0], other[0])  # rho = 0: the anchor does not matter
    dists = [float((lot_solve(system, _params(rho=r))[0] - anchor).norm()) for r in (0.0, 1.0, 100.0, 1e8)]
    assert dists == sorted(dists, reverse=True) and dists[-1] < 1e-5
    _pulled_w, pulled_b = lot_solve(system, _params(rho=1e8))
    torch.testing.assert_close(pulled_b, anchor_b, atol=1e-5, rtol=0)
    # regmean_pp: the same pull
    far = regmean_pp_solve(_system(grams[:, :-1, :-1], ws, anchor=anchor), _params(rho=1e8))[0]
    torch.testing.assert_close(far, anchor, atol=1e-5, rtol=0)


def test_rho_solution_satisfies_its_normal_equations() -> None:
    g = torch.Generator().manual_seed(4)
    grams = torch.stack(
        [(lambda x: x.T @ x / 20)(torch.randn(20, 5, generator=g, dtype=torch.float64)) for _ in range(2)]
    )
    ws = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    anchor = torch.randn(3, 5, generator=g, dtype=torch.float64)
    got, _ = regmean_pp_solve(_system(grams, ws, anchor=anchor), _params(rho=0.7))
    a = grams.sum(0)
    rho_abs = 0.7 * float(torch.diagonal(a).mean())
    lhs = got @ (a + rho_abs * torch.eye(5, dtype=torch.float64))
    rhs = torch.einsum("noi,nij->oj", ws, grams) + rho_abs * anchor
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


def test_singular_gram_keeps_the_experts_mean_in_unseen_directions() -> None:
    """Inputs that never reach some directions (a rank-deficient Gram): the fallback ridge leaves
    the experts' mean there, so one expert is returned exactly."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    x[:, 4:] = 0.0
    weight = torch.randn(1, 3, 6, generator=g, dtype=torch.float64)
    got, _ = regmean_pp_solve(_system((x.T @ x / 30).unsqueeze(0), weight), _params())
    torch.testing.assert_close(got, weight[0])


def test_lot_shrink_leaves_the_bias_column() -> None:
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(25, 4, generator=g, dtype=torch.float64) + 2.0 for _ in range(2)]
    ws, bs = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    ys = [x @ ws[i].T + bs[i] for i, x in enumerate(xs)]
    grams, cross = _lot_stats(xs, ys)
    shrunk = lot_solve(_system(grams, ws, bs, cross=cross), _params(alpha=0.0))
    # alpha = 0 with the bias column kept: per-feature fits that still include the mean shift
    assert torch.isfinite(shrunk[0]).all() and torch.isfinite(shrunk[1]).all()
    diag_only = grams.clone()
    diag_only[:, :-1, :-1] = torch.diag_embed(torch.diagonal(grams[:, :-1, :-1], dim1=-2, dim2=-1))
    want = lot_solve(_system(diag_only, ws, bs, cross=cross), _params())
    torch.testing.assert_close(shrunk[0], want[0])
    torch.testing.assert_close(shrunk[1], want[1])


def test_registered_with_schema_and_anchor_checked() -> None:
    for name in ("lot", "regmean_pp"):
        spec = METHODS.get(name)
        assert spec.layerwise is not None and not spec.needs
        assert {"rho", "alpha"} <= set(spec.search_space())
        assert spec.validate({"anchor": "ties", "anchor_parameters": {"density": 0.3}}).anchor_params().density == 0.3
        with pytest.raises(ConfigError, match="data-free"):
            spec.validate({"anchor": "regmean"})
        with pytest.raises(ConfigError, match="density"):
            spec.validate({"anchor": "ties", "anchor_parameters": {"density": 7}})
    assert METHODS.get("lot").layerwise.cross and METHODS.get("lot").layerwise.bias
    assert not METHODS.get("regmean_pp").layerwise.cross


def test_lot_cross_measured_around_a_reference_gives_the_same_solve() -> None:
    """``cross`` as residuals around a reference layer (what the stage measures) solves the same
    system as the plain cross products."""
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(30, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    ws, bs = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    ys = [x @ ws[i].T + bs[i] for i, x in enumerate(xs)]
    grams, cross = _lot_stats(xs, ys)
    reference = torch.randn(3, 6, generator=g, dtype=torch.float64)
    residual = torch.stack([(y - _augment(x) @ reference.T).T @ _augment(x) / len(x) for x, y in zip(xs, ys)])
    plain = lot_solve(_system(grams, ws, bs, cross=cross), _params(alpha=0.7, rho=0.2))
    system = _system(grams, ws, bs, cross=residual)
    around = lot_solve(LinearSystem(**{**system.__dict__, "reference": reference}), _params(alpha=0.7, rho=0.2))
    torch.testing.assert_close(around[0], plain[0])
    torch.testing.assert_close(around[1], plain[1])
