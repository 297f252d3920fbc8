"""Property tests (hypothesis) of the invariants in docs/algorithms.md section 4, over random shapes,
numbers of experts, densities and weights.

Every method returns the merged task vector (``theta - theta_0``), so "returns theta_1" is
``out == tau_1`` and "returns theta_0" is ``out == 0``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from guardmerge.methods import METHODS, Role, TensorContext  # noqa: E402
from guardmerge.methods.pcb import clip_ranks, clipped  # noqa: E402

NAME = "encoder.layer.0.output.dense.weight"
FAST = settings(max_examples=30, deadline=None, derandomize=True)

shapes = st.tuples(st.integers(1, 6), st.integers(1, 9))
experts = st.integers(1, 4)
seeds = st.integers(0, 2**31 - 1)
densities = st.floats(0.05, 1.0)
weight = st.floats(0.1, 3.0, allow_nan=False, allow_infinity=False)


def tensors(n: int, shape: tuple[int, int], seed: int, scale: float = 0.1) -> torch.Tensor:
    return scale * torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def merge(
    method: str, deltas: torch.Tensor, weights: list[float], stats: dict[str, torch.Tensor] | None = None, **raw: Any
) -> torch.Tensor:
    spec = METHODS.get(method)
    ctx = TensorContext(NAME, Role.LINEAR_WEIGHT, stats=stats or {}, seed=11)
    return spec.fn(deltas.clone(), torch.tensor(weights), spec.validate(raw), ctx)


def grams(n: int, cols: int, seed: int, identical: bool = False) -> torch.Tensor:
    """``[n, cols, cols]`` mean input Grams, well conditioned (more rows than columns)."""
    g = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(4 * cols + 8, cols, generator=g) for _ in range(1 if identical else n)]
    out = torch.stack([x.T @ x / x.shape[0] for x in xs])
    return out.expand(n, cols, cols).clone() if identical else out


def statistics(method: str, n: int, shape: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    if method == "regmean":
        return {"gram": grams(n, shape[1], seed)}
    if method == "fisher":
        return {"fisher": torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed + 2)) + 0.01}
    return {}


# task arithmetic and DARE do not normalise the weights (theta_0 + lambda sum_i w_i tau_i): weight 1
UNNORMALISED = {"task_arithmetic", "dare_linear"}
ONE_EXPERT = {
    "task_arithmetic": {"scaling": 1.0},
    "ties": {"density": 1.0, "scaling": 1.0, "scope": "per_tensor"},
    "dare_linear": {"density": 1.0, "scaling": 1.0},
    "dare_ties": {"density": 1.0, "scaling": 1.0},
    "regmean": {"scaling": 1.0},
    "fisher": {"scaling": 1.0},
    "average": {},
}


@pytest.mark.parametrize("method", sorted(ONE_EXPERT))
@FAST
@given(shape=shapes, seed=seeds, w=weight)
def test_one_expert_with_lambda_one_returns_it(method: str, shape: tuple[int, int], seed: int, w: float) -> None:
    tau = tensors(1, shape, seed)
    w = 1.0 if method in UNNORMALISED else w
    out = merge(method, tau, [w], statistics(method, 1, shape, seed), **ONE_EXPERT[method])
    torch.testing.assert_close(out, tau[0], rtol=1e-4, atol=1e-6)


ZERO_SCALING = {
    "task_arithmetic": {},
    "ties": {"scope": "per_tensor"},
    "dare_linear": {},
    "dare_ties": {},
    "regmean": {},
    "fisher": {},
    "pcb": {"scope": "per_tensor"},
    "breadcrumbs": {},
}


@pytest.mark.parametrize("method", sorted(ZERO_SCALING))
@FAST
@given(n=experts, shape=shapes, seed=seeds, ws=st.lists(weight, min_size=4, max_size=4), density=densities)
def test_lambda_zero_returns_the_base(
    method: str, n: int, shape: tuple[int, int], seed: int, ws: list[float], density: float
) -> None:
    raw = dict(ZERO_SCALING[method], scaling=0.0)
    if method in ("ties", "dare_linear", "dare_ties", "pcb", "breadcrumbs"):
        raw["density"] = density
    out = merge(method, tensors(n, shape, seed), ws[:n], statistics(method, n, shape, seed), **raw)
    assert out.shape == shape
    assert bool((out == 0).all())


@FAST
@given(n=experts, shape=shapes, seed=seeds, ws=st.lists(weight, min_size=4, max_size=4), scaling=st.floats(0.1, 2.0))
def test_regmean_with_identical_grams_is_the_weighted_average(
    n: int, shape: tuple[int, int], seed: int, ws: list[float], scaling: float
) -> None:
    tau = tensors(n, shape, seed)
    w = torch.tensor(ws[:n])
    out = merge("regmean", tau, ws[:n], {"gram": grams(n, shape[1], seed, identical=True)}, scaling=scaling)
    want = scaling * (w[:, None, None] * tau).sum(0) / w.sum()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-6)


@FAST
@given(n=experts, shape=shapes, seed=seeds, ws=st.lists(weight, min_size=4, max_size=4), scaling=st.floats(0.1, 2.0))
def test_ties_at_density_one_with_agreeing_signs_is_the_mean(
    n: int, shape: tuple[int, int], seed: int, ws: list[float], scaling: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    tau = sign * (0.01 + torch.rand((n, *shape), generator=g))  # no zeros: every expert agrees
    w = torch.tensor(ws[:n])
    for scope in ("per_tensor", "global"):
        if scope == "global":  # the global cut at density 1 keeps everything too
            spec = METHODS.get("ties")
            params = spec.validate({"density": 1.0, "scaling": scaling})
            assert spec.prepare is not None
            ctx0 = TensorContext(NAME, Role.LINEAR_WEIGHT)
            found = spec.prepare(params, lambda ctx0=ctx0, tau=tau: iter([(ctx0, tau)]))
            ctx = TensorContext(NAME, Role.LINEAR_WEIGHT, globals=found)
            out = spec.fn(tau.clone(), w, params, ctx)
        else:
            out = merge("ties", tau, ws[:n], density=1.0, scaling=scaling, scope=scope)
        want = scaling * (w[:, None, None] * tau).sum(0) / w.sum()
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@FAST
@given(
    n=st.integers(2, 4),
    d=st.integers(4, 300),
    seed=seeds,
    density=st.floats(0.05, 0.9),
    inter=st.sampled_from(["tanh", "softmax"]),
)
def test_pcb_coordinates_lie_between_the_clipped_extremes_or_are_zero(
    n: int, d: int, seed: int, density: float, inter: str
) -> None:
    tau = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    out = merge("pcb", tau, [1.0] * n, density=density, inter=inter, scope="per_tensor", clip=0.01)
    assert bool(torch.isfinite(out).all())
    lo_rank, hi_rank = clip_ranks(d, 0.01)
    lo = tau.abs().kthvalue(lo_rank, dim=1).values
    hi = tau.abs().kthvalue(hi_rank, dim=1).values
    tc = clipped(tau, lo, hi)
    eps = 1e-5
    inside = (out >= tc.min(0).values - eps) & (out <= tc.max(0).values + eps)
    assert bool((inside | (out == 0)).all())


@FAST
@given(n=experts, d=st.integers(1, 50), value=st.floats(-1.0, 1.0), density=densities)
def test_pcb_with_a_constant_beta_gives_no_nan(n: int, d: int, value: float, density: float) -> None:
    out = merge("pcb", torch.full((n, 1, d), value), [1.0] * n, density=density, scope="per_tensor")
    assert bool(torch.isfinite(out).all())


@FAST
@given(n=experts, shape=shapes, seed=seeds, ws=st.lists(weight, min_size=4, max_size=4), scaling=st.floats(0.1, 2.0))
def test_dare_at_density_one_is_the_identity(
    n: int, shape: tuple[int, int], seed: int, ws: list[float], scaling: float
) -> None:
    tau = tensors(n, shape, seed)
    for rescale_by in ("density", "l1"):
        dare = merge("dare_linear", tau, ws[:n], density=1.0, scaling=scaling, rescale_by=rescale_by)
        plain = merge("task_arithmetic", tau, ws[:n], scaling=scaling)
        torch.testing.assert_close(dare, plain, rtol=1e-5, atol=1e-7)
    dare_ties = merge("dare_ties", tau, ws[:n], density=1.0, scaling=scaling)
    ties = merge("ties", tau, ws[:n], density=1.0, scaling=scaling, scope="per_tensor")
    torch.testing.assert_close(dare_ties, ties, rtol=1e-5, atol=1e-7)
