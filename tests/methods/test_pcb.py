"""PCB-merging: goldens, the whole-tensor reference, global scope, bounds, no NaN."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

from guardmerge.methods import METHODS, reference
from guardmerge.methods.pcb import (
    PairNorms,
    aggregate,
    beta_rank,
    clip_ranks,
    clipped,
    inter_softmax,
    inter_tanh,
    intra_balance,
    score_weights,
)
from guardmerge.methods.registry import Role, TensorContext


def run(deltas: torch.Tensor, weights: torch.Tensor | None = None, **raw: Any) -> torch.Tensor:
    spec = METHODS.get("pcb")
    w = torch.ones(deltas.shape[0]) if weights is None else weights
    return spec.fn(deltas, w, spec.validate(raw), TensorContext("t", Role.LINEAR_WEIGHT))


def merge_model(model: Mapping[str, torch.Tensor], **raw: Any) -> dict[str, torch.Tensor]:
    spec = METHODS.get("pcb")
    params = spec.validate(raw)
    n = next(iter(model.values())).shape[0]

    def stream():
        for name, t in model.items():
            yield TensorContext(name, Role.LINEAR_WEIGHT), t

    g = spec.prepare(params, stream)
    return {
        k: spec.fn(t, torch.ones(n), params, TensorContext(k, Role.LINEAR_WEIGHT, globals=g)) for k, t in model.items()
    }


# ----------------------------------------------------------------------------- goldens


def test_pcb_golden_two_experts() -> None:
    tau = torch.tensor([[1.0, -2.0, 3.0, -4.0], [2.0, 1.0, -1.0, -2.0]])
    # sum_j tau_j = [3, -1, 2, -6]. Expert 1: s = exp(2 (m^2 - 1)), m = [0, 1/3, 2/3, 1],
    # c = tanh([3, 2, 6, 24]); keeps its entries 2 and 3 (above its 2nd-smallest beta).
    # Expert 2: m = [1, 0, 0, 1], c = tanh([6, -1, -2, 12]); keeps entries 0 and 3.
    # tau_m = [2 w/w, 0, 3 w/w, (-4 - 2) / 2] = [2, 0, 3, -3]
    out = run(tau, density=0.75, clip=0.0, scope="per_tensor")
    assert torch.allclose(out, torch.tensor([2.0, 0.0, 3.0, -3.0]), atol=1e-6)
    assert torch.allclose(run(tau, density=0.75, clip=0.0, scope="per_tensor", scaling=0.5), out / 2)


def test_pcb_component_goldens() -> None:
    tau = torch.tensor([[1.0, -2.0, 3.0, -4.0], [2.0, 1.0, -1.0, -2.0]])
    lo, hi = torch.tensor([1.0, 1.0]), torch.tensor([4.0, 2.0])
    s = intra_balance(tau, lo, hi)
    expected_s = [
        [math.exp(2 * ((m * m) - 1)) for m in (0, 1 / 3, 2 / 3, 1)],
        [1, math.exp(-2), math.exp(-2), 1],
    ]
    assert torch.allclose(s, torch.tensor(expected_s))
    c = inter_tanh(tau)
    assert torch.allclose(c, torch.tanh(torch.tensor([[3.0, 2.0, 6.0, 24.0], [6.0, -1.0, -2.0, 12.0]])))
    beta = s * c
    w = score_weights(beta, beta.kthvalue(2, dim=1).values, beta.max(1).values)
    b1 = [expected_s[0][i] * math.tanh(v) for i, v in enumerate((3, 2, 6, 24))]
    assert w[0].tolist()[:2] == [0.0, 0.0]
    assert w[0, 2].item() == pytest.approx((b1[2] - b1[1]) / (b1[3] - b1[1]), rel=1e-5)
    assert w[0, 3].item() == pytest.approx(1.0)
    assert clipped(torch.tensor([[-5.0, 0.5, 2.0]]), torch.tensor([1.0]), torch.tensor([3.0])).tolist() == [
        [-3.0, 1.0, 2.0]
    ]
    merged = aggregate(
        torch.tensor([[1.0, 4.0], [3.0, -2.0]]),
        torch.tensor([[0.5, 0.0], [0.5, 0.0]]),
        torch.ones(2),
    )
    assert merged.tolist() == [2.0, 0.0]


def test_quantile_ranks_follow_the_reference_indexing() -> None:
    assert clip_ranks(100, 0.01) == [2, 99]  # sorted[1], sorted[98]
    assert clip_ranks(4, 0.25) == [2, 3]
    assert clip_ranks(1, 0.01) == [1, 1]
    assert clip_ranks(2, 0.4) == [1, 1]  # never an upper clip below the lower one
    assert beta_rank(100, 0.1) == 91  # sorted[90]: 9 entries stay strictly above
    assert beta_rank(10, 1.0) == 1


def test_softmax_inter_golden() -> None:
    tau = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.5, 1.0]])
    n = tau.shape[0]
    lo, hi, logz = torch.zeros(n, n), torch.zeros(n, n), torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            x = (tau[i] * tau[j]).numpy().astype(np.float64)
            lo[i, j], hi[i, j] = float(x.min()), float(x.max())
            logz[i, j] = math.log(np.exp((x - x.min()) / (x.max() - x.min())).sum())
    c = inter_softmax(tau, PairNorms(lo, hi, logz))
    expected = np.zeros((n, 3))
    for i in range(n):
        for j in range(n):
            x = (tau[i] * tau[j]).numpy().astype(np.float64)
            e = np.exp((x - x.min()) / (x.max() - x.min()))
            expected[i] += e / e.sum()
    assert np.allclose(c.numpy(), expected, atol=1e-6)
    assert np.allclose(c.sum(1).numpy(), [n, n], atol=1e-5)  # each softmax sums to 1


@pytest.mark.parametrize(("n", "d", "ratio", "clip"), [(3, 200, 0.1, 0.01), (5, 97, 0.2, 0.05), (2, 50, 0.5, 0.0)])
def test_pcb_matches_the_reference_algorithm(n: int, d: int, ratio: float, clip: float) -> None:
    tau = torch.randn(n, d, generator=torch.Generator().manual_seed(d)) * 0.01
    tau[0, :5] *= 30  # outliers for the clamp
    out = run(tau, density=ratio, clip=clip, scope="per_tensor")
    ref = reference.pcb(tau, torch.ones(n), density=ratio, clip=clip).numpy()
    assert np.allclose(out.numpy(), ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("inter", ["tanh", "softmax"])
def test_global_scope_equals_the_reference_on_the_flattened_model(inter: str) -> None:
    model = fake_model(4)
    weights = torch.tensor([0.5, 1.0, 2.0])
    spec = METHODS.get("pcb")
    params = spec.validate({"inter": inter, "density": 0.2, "clip": 0.02})
    g = spec.prepare(params, lambda: ((TensorContext(k, Role.LINEAR_WEIGHT), t) for k, t in model.items()))
    merged = [spec.fn(t, weights, params, TensorContext(k, Role.LINEAR_WEIGHT, globals=g)) for k, t in model.items()]
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in model.values()], 1)
    want = reference.pcb(flat, weights, density=0.2, clip=0.02, inter=inter)
    got = torch.cat([m.reshape(-1) for m in merged])
    if inter == "tanh":  # the same float operations: bit for bit
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------- global scope


def fake_model(seed: int, n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(n, 9, 4, generator=g) * 0.02,
        "w": torch.randn(n, 8, 8, generator=g) * 0.01,
        "b": torch.randn(n, 8, generator=g) * 0.05,
        "ln": torch.zeros(n, 6),
    }


@pytest.mark.parametrize("inter", ["tanh", "softmax"])
def test_global_scope_equals_per_tensor_on_the_flattened_model(inter: str) -> None:
    model = fake_model(0)
    merged = merge_model(model, inter=inter, density=0.2)
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in model.values()], 1)
    ref = run(flat, inter=inter, density=0.2, scope="per_tensor")
    got = torch.cat([merged[k].reshape(-1) for k in model])
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-9)
    assert (got != 0).any()


def test_global_prepare_makes_four_passes() -> None:
    model = fake_model(1)
    calls = []

    def stream():
        calls.append(1)
        for name, t in model.items():
            yield TensorContext(name, Role.LINEAR_WEIGHT), t

    spec = METHODS.get("pcb")
    g = spec.prepare(spec.validate({}), stream)
    assert len(calls) == 4
    assert set(g) == {"clip_lo", "clip_hi", "beta_lo", "beta_max"}
    assert spec.prepare(spec.validate({"scope": "per_tensor"}), stream) == {}


def test_global_merge_without_prepare_fails_clearly() -> None:
    with pytest.raises(ValueError, match="prepare"):
        run(torch.randn(2, 3))


# ------------------------------------------------------------------- invariants, numerics


@pytest.mark.parametrize("inter", ["tanh", "softmax"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_coordinate_lies_between_clipped_extremes_or_is_zero(inter: str, seed: int) -> None:
    tau = torch.randn(4, 300, generator=torch.Generator().manual_seed(seed))
    out = run(tau, inter=inter, scope="per_tensor", density=0.3)
    rows = tau
    d = rows.shape[1]
    ranks = clip_ranks(d, 0.01)
    lo = rows.abs().kthvalue(ranks[0], dim=1).values
    hi = rows.abs().kthvalue(ranks[1], dim=1).values
    tc = clipped(rows, lo, hi)
    low, high = tc.min(0).values, tc.max(0).values
    eps = 1e-6
    inside = (out >= low - eps) & (out <= high + eps)
    assert bool((inside | (out == 0)).all())
    assert (out != 0).any()


CASES = {
    "constant": lambda n, d: torch.full((n, d), 0.3),
    "zero": lambda n, d: torch.zeros(n, d),
    "constant_rows": lambda n, d: torch.arange(1, n + 1, dtype=torch.float32)[:, None].expand(n, d).clone(),
    "one_nonzero": lambda n, d: torch.zeros(n, d).index_fill_(1, torch.tensor([0]), 1.0),
    "huge_and_tiny": lambda n, d: torch.logspace(-30, 30, d)[None].expand(n, d) * torch.randn(n, 1),
    "random": lambda n, d: torch.randn(n, d),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [1, 2, 40])
@pytest.mark.parametrize("inter", ["tanh", "softmax"])
def test_never_nan_or_inf(case: str, n: int, inter: str) -> None:
    torch.manual_seed(0)
    tau = CASES[case](n, 64)
    out = run(tau, inter=inter, scope="per_tensor")
    assert torch.isfinite(out).all()
    model = {"a": tau[:, :20].reshape(n, 4, 5), "b": tau[:, 20:]}
    for v in merge_model(model, inter=inter).values():
        assert torch.isfinite(v).all()


def test_constant_and_zero_task_vectors_merge_to_zero() -> None:
    assert torch.equal(run(torch.zeros(3, 10), scope="per_tensor"), torch.zeros(10))
    assert torch.equal(run(torch.full((3, 10), 0.5), scope="per_tensor"), torch.zeros(10))


def test_expert_weights_scale_their_contribution() -> None:
    tau = torch.randn(3, 100, generator=torch.Generator().manual_seed(5))
    base = run(tau, scope="per_tensor")
    assert torch.allclose(run(tau, torch.full((3,), 2.0), scope="per_tensor"), 2 * base)


def test_non_finite_task_vectors_are_refused() -> None:
    from guardmerge.errors import CheckpointError

    tau = torch.ones(2, 4)
    tau[1, 2] = float("inf")
    with pytest.raises(CheckpointError):
        run(tau, scope="per_tensor")
    with pytest.raises(CheckpointError):
        merge_model({"a": tau})


@pytest.mark.parametrize("inter", ["tanh", "softmax"])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_results_do_not_depend_on_the_chunking(inter: str, scope: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import guardmerge.methods.fast.selection as selection

    model = fake_model(3)
    whole = merge_model(model, inter=inter, scope=scope, density=0.3)
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 12)
    chunked = merge_model(model, inter=inter, scope=scope, density=0.3)
    for name in model:
        assert torch.allclose(whole[name], chunked[name], rtol=1e-5, atol=1e-9), name
