"""WUDI merging: normal equations, the orthogonal-row-space case, the anchor limit, the paper's
Adam procedure, registration (docs/algorithms.md section 2)."""

from __future__ import annotations

import pytest
import torch

from guardmerge.config import parse_config
from guardmerge.errors import ConfigError
from guardmerge.methods import METHODS, Role, TensorContext, reference
from guardmerge.methods.wudi import wudi_loss

NAME = "encoder.layer.0.attention.self.query.weight"
F64 = torch.float64


def run(deltas: torch.Tensor, weights: list[float], role: Role = Role.LINEAR_WEIGHT, **params: object) -> torch.Tensor:
    spec = METHODS.get("wudi")
    ctx = TensorContext(name=NAME, role=role)
    return spec.fn(deltas, torch.tensor(weights, dtype=deltas.dtype), spec.validate(params), ctx)


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def system(deltas: torch.Tensor, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i G_i`` and ``sum_i tau_i G_i`` with ``G_i = w_i tau_i^T tau_i / ||tau_i||^2``,
    written out independently of the module."""
    grams = [w * t.T @ t / t.square().sum() for t, w in zip(deltas, weights)]
    return sum(grams), sum(t @ g for t, g in zip(deltas, grams))


def test_registered_with_schema() -> None:
    spec = METHODS.get("wudi")
    assert spec.needs == frozenset()
    p = spec.validate({})
    assert (p.rho, p.anchor_scaling, p.scaling, p.ridge, p.solver, p.steps, p.lr) == (
        3.0,
        0.5,
        1.0,
        1e-6,
        "closed_form",
        300,
        1e-5,
    )
    space = spec.search_space()
    assert (space["rho"].low, space["rho"].high) == (0.0, 10.0)
    assert (space["anchor_scaling"].low, space["anchor_scaling"].high) == (0.1, 1.5)
    assert (space["scaling"].low, space["scaling"].high) == (0.5, 1.5)
    assert set(space) == {"rho", "anchor_scaling", "scaling"}
    for bad in ({"rho": -1.0}, {"solver": "sgd"}, {"steps": -1}, {"lr": 0.0}, {"ridge": -1.0}, {"lambda": 1.0}):
        with pytest.raises(ConfigError):
            spec.validate(bad)


def test_config_with_method_wudi_validates() -> None:
    cfg = parse_config(
        {
            "base_model": "base",
            "experts": [{"model": "a", "task": "hate"}, {"model": "b", "task": "injection"}],
            "method": "wudi",
            "parameters": {"rho": 0.0, "solver": "adam", "steps": 50},
            "heads": "multi",
        }
    )
    p = METHODS.get(cfg.method).validate(cfg.parameters)
    assert (p.rho, p.solver, p.steps, p.anchor_scaling) == (0.0, "adam", 50, 0.5)
    bad = parse_config(
        {
            "base_model": "base",
            "experts": [{"model": "a", "task": "hate"}],
            "method": "wudi",
            "parameters": {"rho": -2.0},
        }
    )
    with pytest.raises(ConfigError, match="wudi"):
        METHODS.get(bad.method).validate(bad.parameters)


@pytest.mark.parametrize("rho", [0.0, 0.7, 3.0])
def test_closed_form_satisfies_its_normal_equations(rho: float) -> None:
    deltas = randn(3, 5, 8, seed=0)  # sum_i G_i has rank 8: regular
    weights = [1.0, 2.0, 0.5]
    tau = run(deltas, weights, rho=rho, anchor_scaling=0.4)
    a, b = system(deltas, weights)
    rho_abs = rho * torch.diagonal(a).mean()
    anchor = 0.4 * sum(w * t for w, t in zip(weights, deltas))
    residual = tau @ (a + rho_abs * torch.eye(8, dtype=F64)) - (b + rho_abs * anchor)
    assert residual.abs().max() < 1e-10 * b.abs().max()
    # and it is the minimiser: no perturbation lowers the loss
    loss = wudi_loss(tau, deltas, torch.tensor(weights, dtype=F64), rho_abs=float(rho_abs), anchor=anchor)
    for seed in range(5):
        bumped = tau + 1e-3 * randn(5, 8, seed=100 + seed)
        assert wudi_loss(bumped, deltas, torch.tensor(weights, dtype=F64), rho_abs=float(rho_abs), anchor=anchor) > loss


@pytest.mark.parametrize("d_in, ridge, tol", [(9, 1e-6, 1e-10), (10, 0.0, 1e-10), (10, 1e-6, 1e-4)])
def test_orthogonal_row_spaces_give_the_sum(d_in: int, ridge: float, tol: float) -> None:
    """rho = 0, task vectors whose ROW spaces (subspaces of R^in) are mutually orthogonal:
    tau_i = M_i P_i with P_i projecting the input onto a disjoint block of coordinates. Then
    tau_j G_i = 0 for j != i, so (sum_j tau_j) G_i = tau_i G_i and sum_i tau_i solves the normal
    equations, whatever the weights. With d_in = 9 the blocks cover the input (sum_i G_i
    regular); with d_in = 10 coordinate 9 is unused (sum_i G_i singular): ridge 0 takes the
    minimum-norm solution (exact), the default ridge fallback is exact up to O(ridge)."""
    blocks = [range(3), range(3, 6), range(6, 9)]
    taus = []
    for i, block in enumerate(blocks):
        proj = torch.zeros(d_in, d_in, dtype=F64)
        proj[list(block), list(block)] = 1.0
        taus.append(randn(4, d_in, seed=10 + i) @ proj)
    deltas = torch.stack(taus)
    merged = run(deltas, [1.0, 2.0, 0.5], rho=0.0, anchor_scaling=1.0, ridge=ridge)
    torch.testing.assert_close(merged, deltas.sum(0), rtol=tol, atol=tol)
    # generic (overlapping) row spaces: the solution is not the plain sum
    generic = randn(3, 4, d_in, seed=20)
    assert (run(generic, [1.0, 1.0, 1.0], rho=0.0, ridge=ridge) - generic.sum(0)).abs().max() > 1e-2


def test_large_rho_tends_to_the_anchor() -> None:
    deltas = randn(3, 6, 10, seed=1)
    weights = [1.0, 0.5, 2.0]
    anchor = 0.7 * sum(w * t for w, t in zip(weights, deltas))
    gaps = [
        float((run(deltas, weights, rho=rho, anchor_scaling=0.7) - anchor).norm()) for rho in (0.0, 1.0, 10.0, 100.0)
    ]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 1e-1
    far = run(deltas, weights, rho=1e6, anchor_scaling=0.7)
    torch.testing.assert_close(far, anchor, rtol=1e-5, atol=1e-5 * float(anchor.abs().max()))


@pytest.mark.parametrize("ridge, tol", [(0.0, 1e-10), (1e-6, 1e-4)])
def test_one_expert_returns_itself(ridge: float, tol: float) -> None:
    delta = randn(1, 4, 6, seed=2)  # G_1 has rank 4 < 6: singular, tau_1 lies in its range
    params = {"rho": 0.0, "scaling": 1.0, "anchor_scaling": 1.0, "ridge": ridge}
    torch.testing.assert_close(run(delta, [1.0], **params), delta[0], rtol=tol, atol=tol)
    for role in (Role.BIAS, Role.NORM, Role.EMBEDDING, Role.HEAD):
        assert torch.equal(run(delta, [1.0], role=role, **params), delta[0])
    bias = randn(1, 6, seed=3)
    assert torch.equal(run(bias, [1.0], role=Role.BIAS, **params), bias[0])
    # scaling multiplies the solution; float32 in, float32 out
    torch.testing.assert_close(run(delta, [1.0], **{**params, "scaling": 0.5}), 0.5 * delta[0], rtol=tol, atol=tol)
    out32 = run(delta.float(), [1.0], **params)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, delta[0].float(), rtol=1e-4, atol=1e-5)


def test_non_linear_tensors_get_task_arithmetic_at_the_anchor() -> None:
    weights = [1.0, 3.0]
    for role, shape in (
        (Role.BIAS, (5,)),
        (Role.NORM, (5,)),
        (Role.EMBEDDING, (7, 5)),
        (Role.HEAD, (3, 5)),
        (Role.OTHER, (4, 5)),
    ):
        deltas = randn(2, *shape, seed=4)
        out = run(deltas, weights, role=role, anchor_scaling=0.4, scaling=1.5, rho=0.0)
        torch.testing.assert_close(out, 1.5 * 0.4 * (deltas[0] + 3.0 * deltas[1]))
    # the same 2-D values as a Linear weight are solved, not averaged
    deltas = randn(2, 7, 5, seed=4)
    assert not torch.allclose(
        run(deltas, weights, anchor_scaling=0.4, scaling=1.5), 1.5 * 0.4 * (deltas[0] + 3.0 * deltas[1])
    )


@pytest.mark.parametrize("solver", ["closed_form", "adam"])
def test_zero_task_vectors_contribute_nothing(solver: str) -> None:
    deltas = randn(3, 4, 6, seed=5)
    with_zero = torch.cat([deltas[:2], torch.zeros(1, 4, 6, dtype=F64)])
    for rho in (0.0, 3.0):
        out = run(with_zero, [1.0, 1.0, 1.0], rho=rho, solver=solver, steps=20)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, run(deltas[:2], [1.0, 1.0], rho=rho, solver=solver, steps=20))
    zeros = torch.zeros(2, 4, 6, dtype=F64)
    for rho in (0.0, 3.0):
        assert torch.equal(run(zeros, [1.0, 1.0], rho=rho, solver=solver, steps=5), torch.zeros(4, 6, dtype=F64))


def test_weights_scale_the_grams_and_zero_drops_an_expert() -> None:
    deltas = randn(3, 4, 6, seed=6)
    for rho in (0.0, 3.0):
        dropped = run(deltas, [1.0, 0.0, 2.0], rho=rho)
        torch.testing.assert_close(dropped, run(deltas[[0, 2]], [1.0, 2.0], rho=rho))
    # weights change the rho = 0 solution (they weight the Grams) ...
    assert (run(deltas, [1.0, 1.0, 1.0], rho=0.0) - run(deltas, [1.0, 5.0, 1.0], rho=0.0)).abs().max() > 1e-3
    # ... and only their ratios matter there (the anchor is unused at rho = 0)
    torch.testing.assert_close(run(deltas, [1.0, 5.0, 1.0], rho=0.0), run(deltas, [2.0, 10.0, 2.0], rho=0.0))


def test_adam_decreases_the_loss_from_its_init() -> None:
    deltas = randn(3, 6, 10, seed=7, dtype=torch.float32)
    weights = [1.0, 2.0, 0.5]
    w = torch.tensor(weights)
    init = sum(wi * t for wi, t in zip(weights, deltas))
    for rho in (0.0, 3.0):
        anchor = 0.5 * init
        rho_abs = rho * sum(weights) / 10  # = rho * mean(diag(sum_i G_i)), trace(G_i) = w_i
        out = run(deltas, weights, solver="adam", rho=rho, steps=300, lr=1e-3)
        assert wudi_loss(out, deltas, w, rho_abs=rho_abs, anchor=anchor) < 0.9 * wudi_loss(
            init, deltas, w, rho_abs=rho_abs, anchor=anchor
        )
    # the paper's defaults (lr 1e-5, 300 steps) move little, but downhill
    out = run(deltas, weights, solver="adam", rho=0.0)
    assert 0 < wudi_loss(out, deltas, w) < wudi_loss(init, deltas, w)
    assert 0 < float((out - init).abs().max()) < 300 * 1e-5 * 1.01


def test_adam_with_zero_steps_returns_the_init() -> None:
    deltas = randn(3, 4, 6, seed=8, dtype=torch.float32)
    weights = [1.0, 2.0, 0.5]
    init = sum(wi * t for wi, t in zip(weights, deltas))
    torch.testing.assert_close(run(deltas, weights, solver="adam", steps=0, scaling=0.5), 0.5 * init)


def test_adam_runs_under_no_grad_and_approaches_the_closed_form() -> None:
    deltas = randn(2, 3, 5, seed=9, dtype=torch.float32)
    params = {"rho": 1.0, "anchor_scaling": 0.5}
    with torch.no_grad():
        adam = run(deltas, [1.0, 1.0], solver="adam", steps=3000, lr=1e-2, **params)
    with torch.inference_mode():
        adam_inf = run(deltas, [1.0, 1.0], solver="adam", steps=10, lr=1e-2, **params)
    assert torch.isfinite(adam_inf).all()
    exact = run(deltas.double(), [1.0, 1.0], **params).float()
    torch.testing.assert_close(adam, exact, rtol=0, atol=1e-3)


@pytest.mark.parametrize("rho", [0.0, 3.0])
def test_closed_form_equals_the_reference(rho: float) -> None:
    deltas = randn(3, 5, 8, seed=11)  # sum_i G_i regular
    want = reference.wudi(deltas, torch.tensor([1.0, 2.0, 0.5], dtype=F64), rho=rho, anchor_scaling=0.4, scaling=1.5)
    torch.testing.assert_close(run(deltas, [1.0, 2.0, 0.5], rho=rho, anchor_scaling=0.4, scaling=1.5), want)
