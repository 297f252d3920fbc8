"""ProDistill's pure pieces: the coefficient merge and the per-block fit on toy blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from guardmerge.methods import METHODS, BlockProblem
from guardmerge.methods.prodistill import block_loss, coefficient_merge, distill_block


def _toy(n_tasks: int = 2, d: int = 6, rows: int = 40, seed: int = 0) -> tuple[nn.Linear, BlockProblem]:
    """A Linear "block"; task i's target is its expert ``W0 + tau_i`` on the task's inputs.

    The merged inputs equal the experts' (one block, nothing below it drifted)."""
    gen = torch.Generator().manual_seed(seed)
    block = nn.Linear(d, d)
    base = {n: p.detach().clone() for n, p in block.named_parameters()}
    deltas = {n: 0.5 * torch.randn(n_tasks, *p.shape, generator=gen) for n, p in base.items()}
    inputs = [[torch.randn(rows, d, generator=gen) for _ in range(2)] for _ in range(n_tasks)]
    targets = [
        [x @ (base["weight"] + deltas["weight"][i]).T + base["bias"] + deltas["bias"][i] for x in inputs[i]]
        for i in range(n_tasks)
    ]

    def forward(params: dict[str, torch.Tensor], t: int, b: int) -> torch.Tensor:
        return functional_call(block, dict(params), (inputs[t][b],))

    return block, BlockProblem("toy", base, deltas, forward, targets, torch.ones(n_tasks))


def _params(**kw: object):
    return METHODS.get("prodistill").validate(kw)


def test_coefficient_merge_is_base_plus_weighted_task_vectors() -> None:
    base = {"w": torch.tensor([1.0, 2.0])}
    deltas = {"w": torch.tensor([[1.0, 0.0], [0.0, 3.0]])}
    out = coefficient_merge(base, deltas, {"w": torch.tensor([[0.5, 2.0], [1.0, -1.0]])})
    torch.testing.assert_close(out["w"], torch.tensor([1.5, -1.0]))
    per_tensor = coefficient_merge(base, deltas, {"w": torch.tensor([[0.5], [2.0]])})
    torch.testing.assert_close(per_tensor["w"], torch.tensor([1.5, 8.0]))


def test_one_task_is_recovered_by_the_fit() -> None:
    """One task from coefficients 0.3: the fit moves them to the expert (loss near zero)."""
    _, problem = _toy(n_tasks=1)
    start = block_loss(
        problem,
        coefficient_merge(
            problem.base, problem.deltas, {n: torch.full_like(d, 0.3) for n, d in problem.deltas.items()}
        ),
    )
    fitted = distill_block(problem, _params(epochs=150, lr=0.02))
    assert block_loss(problem, fitted) < 1e-3 * start


@pytest.mark.parametrize("granularity", ["element", "tensor"])
def test_fit_lowers_the_loss_and_trains_coefficients_only(granularity: str) -> None:
    _, problem = _toy()
    params = _params(epochs=40, granularity=granularity)
    start = coefficient_merge(
        problem.base, problem.deltas, {n: torch.full((2, *([1] * d[0].dim())), 0.3) for n, d in problem.deltas.items()}
    )
    fitted = distill_block(problem, params)
    assert block_loss(problem, fitted) < 0.9 * block_loss(problem, start)
    residuals = []
    for name, theta in fitted.items():
        tau = problem.deltas[name].reshape(2, -1)
        moved = (theta - problem.base[name]).reshape(-1, 1)
        coef = torch.linalg.lstsq(tau.T, moved).solution
        residuals.append(float((tau.T @ coef - moved).abs().max()))
    if granularity == "tensor":  # every tensor stays in the span of the two task vectors
        assert max(residuals) < 1e-5, residuals
    else:  # one coefficient per element: the weight tensor leaves that span
        assert max(residuals) > 1e-4, residuals


def test_the_start_is_kept_when_the_fit_cannot_improve_it() -> None:
    """One task at coefficients 1 is already exact: Adam's steps are discarded."""
    _, problem = _toy(n_tasks=1)
    fitted = distill_block(problem, _params(init_scaling=1.0, epochs=5, lr=0.05))
    for name, theta in fitted.items():
        torch.testing.assert_close(theta, problem.base[name] + problem.deltas[name][0], atol=0, rtol=0)


def test_expert_weights_scale_the_start_and_the_loss() -> None:
    _, problem = _toy()
    weighted = BlockProblem(
        problem.name, problem.base, problem.deltas, problem.forward, problem.targets, torch.tensor([2.0, 0.0])
    )
    # a zero-weight task contributes nothing to the loss and starts at coefficient 0
    fitted = distill_block(weighted, _params(epochs=0 + 1, lr=1e-9))
    for name, theta in fitted.items():
        want = problem.base[name] + 0.6 * problem.deltas[name][0]
        torch.testing.assert_close(theta, want, atol=1e-5, rtol=0)
