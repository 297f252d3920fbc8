"""Model Stock: per-tensor interpolation ratio from the mean pairwise cosine."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from guardmerge.methods import METHODS, reference
from guardmerge.methods.model_stock import interpolation_ratio, mean_pairwise_cosine
from guardmerge.methods.registry import Role, TensorContext


def run(deltas: torch.Tensor, weights: torch.Tensor | None = None, **raw: Any) -> torch.Tensor:
    spec = METHODS.get("model_stock")
    w = torch.ones(deltas.shape[0]) if weights is None else weights
    return spec.fn(deltas, w, spec.validate(raw), TensorContext("t", Role.LINEAR_WEIGHT))


def test_two_experts_golden() -> None:
    # cos = 1/sqrt(2); t = 2c / (c + 1) = 2 (sqrt(2) - 1); mean = [1, 0.5]
    out = run(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    t = 2 * (math.sqrt(2) - 1)
    assert torch.allclose(out, torch.tensor([t, 0.5 * t]))


def test_three_experts_golden() -> None:
    tau = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    c = (0 + 2 / math.sqrt(2)) / 3  # pairs: 0, 1/sqrt2, 1/sqrt2
    assert float(mean_pairwise_cosine(tau)) == pytest.approx(c)
    t = 3 * c / (2 * c + 1)
    assert torch.allclose(run(tau), t * tau.mean(0))


def test_one_expert_returns_it() -> None:
    tau = torch.randn(1, 4, 3)
    assert torch.allclose(run(tau), tau[0])
    assert interpolation_ratio(0.3, 1) == 1.0


def test_identical_experts_give_t_one() -> None:
    tau = torch.randn(1, 10).expand(3, 10).clone()
    assert torch.allclose(run(tau), tau[0], atol=1e-6)


def test_zero_vectors_and_negative_cosine_give_theta_0() -> None:
    assert torch.equal(run(torch.tensor([[0.0, 0.0], [1.0, 1.0]])), torch.zeros(2))
    assert torch.equal(run(torch.zeros(3, 5)), torch.zeros(5))
    assert torch.equal(run(torch.tensor([[1.0, 0.0], [-1.0, 0.1]])), torch.zeros(2))


def test_weighted_mean_and_scaling() -> None:
    tau = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = 2 * (math.sqrt(2) - 1)
    out = run(tau, torch.tensor([3.0, 1.0]), scaling=0.5)
    assert torch.allclose(out, 0.5 * t * torch.tensor([1.0, 0.25]))
    with pytest.raises(ValueError, match="sum to 0"):
        run(tau, torch.tensor([1.0, -1.0]))


def test_lambda_zero_returns_theta_0() -> None:
    assert torch.equal(run(torch.randn(3, 4), scaling=0.0), torch.zeros(4))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_equals_the_reference(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    tau = torch.randn(k, 6, 5, generator=g) + torch.randn(6, 5, generator=g)  # a shared direction: 0 < cos < 1
    w = torch.rand(k, generator=g) + 0.5
    torch.testing.assert_close(run(tau, w, scaling=0.8), reference.model_stock(tau, w, 0.8), rtol=1e-5, atol=1e-7)
