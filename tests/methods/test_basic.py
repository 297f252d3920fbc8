"""Weighted average and the weighted sum: goldens and the whole-tensor reference."""

import pytest
import torch

from guardmerge.methods import METHODS, Role, TensorContext, reference
from guardmerge.methods.basic import weighted_sum

CTX = TensorContext(name="w", role=Role.LINEAR_WEIGHT)


def run(name: str, deltas: torch.Tensor, weights: list[float], **params: object) -> torch.Tensor:
    spec = METHODS.get(name)
    return spec.fn(deltas, torch.tensor(weights), spec.validate(params), CTX)


def test_average_matches_hand_computation() -> None:
    # theta_0 = 0 so deltas are the weights themselves: (1*[1,2] + 3*[5,-2]) / 4 = [4, -1]
    deltas = torch.tensor([[1.0, 2.0], [5.0, -2.0]])
    assert torch.equal(run("average", deltas, [1.0, 3.0]), torch.tensor([4.0, -1.0]))


def test_average_of_one_model_returns_it() -> None:
    d = torch.randn(1, 3, 4)
    assert torch.allclose(run("average", d, [2.5]), d[0])


def test_average_rejects_zero_weight_sum() -> None:
    with pytest.raises(ValueError, match="sum to 0"):
        run("average", torch.ones(2, 3), [1.0, -1.0])


def test_weighted_sum_equals_the_reference() -> None:
    deltas = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([0.3, 1.0, 2.5])
    torch.testing.assert_close(weighted_sum(deltas, w), reference.weighted_sum(deltas, w), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(run("average", deltas, w.tolist()), reference.average(deltas, w), rtol=1e-6, atol=1e-7)
