import pytest
import torch

from guardmerge.methods import METHODS, Role, TensorContext

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


def test_task_arithmetic_matches_hand_computation() -> None:
    deltas = torch.tensor([[1.0, -2.0, 0.5], [3.0, 4.0, -0.5]])
    # 0.5 * (2*[1,-2,.5] + 1*[3,4,-.5]) = 0.5 * [5, 0, 0.5]
    out = run("task_arithmetic", deltas, [2.0, 1.0], scaling=0.5)
    assert torch.allclose(out, torch.tensor([2.5, 0.0, 0.25]))


def test_task_arithmetic_scaling_zero_returns_base() -> None:
    assert torch.count_nonzero(run("task_arithmetic", torch.randn(3, 5), [1, 1, 1], scaling=0.0)) == 0


def test_task_arithmetic_default_scaling_is_documented_value() -> None:
    assert METHODS.get("task_arithmetic").validate({}).scaling == 0.3
