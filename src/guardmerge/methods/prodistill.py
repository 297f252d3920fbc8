"""ProDistill: few-shot layer-wise distillation of merge coefficients (Xu et al. 2025,
"Scalable Model Merging with Progressive Layerwise Distillation", arXiv 2502.12706).

The one step in guardmerge that uses gradients, and it trains **merge coefficients only**, never
the weights: every parameter of a block is

    theta = theta_0 + sum_i c_i * tau_i

with ``c_i`` one coefficient per element of ``tau_i`` (``granularity: element``, the paper's
default) or one per task and tensor (``granularity: tensor``, layer-wise AdaMerging's form).
Block by block from the embeddings up (then the pooler, where the family has one), the
coefficients are fitted with Adam on a few unlabelled texts per task to

    min_c sum_i w_i / mean(w) * mean_tokens ||f(theta(c); X~_i) - f(theta_i; X_i)||^2

``X~_i`` the merged model's inputs to the block (the blocks below already distilled), ``X_i``
the expert's own inputs, ``f`` the block. The stage then pushes the texts through the fitted
block and goes on (:mod:`guardmerge.merge.layerwise`). Coefficients start at
``init_scaling * w_i`` (task arithmetic, 0.3 in the paper's code); the paper's NLU settings are
Adam at lr 0.01, 50 epochs over 64 texts a task, batch 16.

guardmerge keeps the start when the fit did not lower the block's loss on the texts it saw,
measured once before and once after; so a merge the texts cannot improve (one expert at
``init_scaling`` 1) is returned exactly.

Every tensor outside the distilled blocks (embeddings, and everything when no text is given)
is task arithmetic at ``init_scaling``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field

from guardmerge.methods import params as shared
from guardmerge.methods.basic import weighted_sum
from guardmerge.methods.registry import (
    METHODS,
    BlockProblem,
    LayerwiseSpec,
    MethodParams,
    MethodSpec,
    TensorContext,
    searchable,
)


class ProDistillParams(MethodParams):
    init_scaling: float = Field(
        0.3,
        description="starting coefficient of every task vector (task arithmetic's lambda); "
        "also the merge of every tensor outside the distilled blocks",
        json_schema_extra=searchable(0.1, 1.0),
    )
    granularity: Literal["element", "tensor"] = Field(
        "element", description="one coefficient per element of each task vector, or one per task and tensor"
    )
    lr: float = shared.lr(0.01, search=(1e-3, 0.1))
    epochs: int = Field(50, ge=1, description="passes over every task's texts per block")
    seed: int = Field(0, description="seed of the batch order")
    texts: int = shared.texts(64)
    max_length: int = shared.max_length()
    batch_size: int = shared.batch_size(16, description="texts per step (one task per batch, as the paper)")


def coefficient_merge(
    base: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor], coefficients: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``theta = theta_0 + sum_i c_i tau_i`` per parameter.

    ``base[n]``: ``[*shape]``; ``deltas[n]``: ``[N, *shape]``; ``coefficients[n]``: ``[N, *shape]``
    or ``[N, 1, ...]`` (broadcast). Differentiable in the coefficients.
    """
    return {n: base[n] + (coefficients[n] * deltas[n]).sum(dim=0) for n in base}


def _loss(problem: BlockProblem, parameters: Mapping[str, torch.Tensor], task: int, batch: int) -> torch.Tensor:
    """One batch's weighted mean squared error against the expert's block output."""
    scale = float(problem.weights[task]) / float(problem.weights.mean())
    out = problem.forward(parameters, task, batch)
    return scale * torch.nn.functional.mse_loss(out, problem.targets[task][batch].to(out.dtype))


def block_loss(problem: BlockProblem, parameters: Mapping[str, torch.Tensor]) -> float:
    """The objective over every task and batch (each task the mean of its batches)."""
    with torch.no_grad():
        total = 0.0
        for t, batches in enumerate(problem.targets):
            total += sum(float(_loss(problem, parameters, t, b)) for b in range(len(batches))) / len(batches)
        return total


def distill_block(problem: BlockProblem, params: ProDistillParams) -> dict[str, torch.Tensor]:
    """Fit the block's merge coefficients with Adam; return the block's parameters (float32).

    One step per batch, the batches of every task shuffled together each epoch (seeded).
    Returns the start (coefficients at ``init_scaling``) if the fit did not lower
    :func:`block_loss`.
    """
    n = int(problem.weights.numel())
    init = params.init_scaling * problem.weights.to(torch.float32)
    coefficients = {
        name: (
            init.reshape(n, *([1] * (d.dim() - 1))).expand(n, *d.shape[1:])
            if params.granularity == "element"
            else init.reshape(n, *([1] * (d.dim() - 1)))
        )
        .clone()
        .requires_grad_(True)
        for name, d in problem.deltas.items()
    }
    base = {k: v.float() for k, v in problem.base.items()}
    deltas = {k: v.float() for k, v in problem.deltas.items()}
    start = {k: v.detach() for k, v in coefficient_merge(base, deltas, coefficients).items()}
    order = [(t, b) for t, batches in enumerate(problem.targets) for b in range(len(batches))]
    generator = torch.Generator().manual_seed(params.seed)
    optimizer = torch.optim.Adam(list(coefficients.values()), lr=params.lr)
    with torch.enable_grad():
        for _ in range(params.epochs):
            for i in torch.randperm(len(order), generator=generator).tolist():
                optimizer.zero_grad(set_to_none=True)
                _loss(problem, coefficient_merge(base, deltas, coefficients), *order[i]).backward()
                optimizer.step()
    fitted = {k: v.detach() for k, v in coefficient_merge(base, deltas, coefficients).items()}
    return fitted if block_loss(problem, fitted) < block_loss(problem, start) else start


def prodistill_start(
    deltas: torch.Tensor, weights: torch.Tensor, params: ProDistillParams, ctx: TensorContext
) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: task arithmetic at ``init_scaling`` (the start, and
    the merge of every tensor the distillation does not reach)."""
    return weighted_sum(deltas, params.init_scaling * weights)


METHODS.register(
    MethodSpec(
        name="prodistill",
        fn=prodistill_start,
        params=ProDistillParams,
        summary="ProDistill: element-wise (or per-tensor) merge coefficients of the task vectors fitted block by "
        "block with Adam, so each merged block on merged inputs reproduces each expert's block on its own inputs; "
        "trains coefficients only. Needs: data.",
        needs=frozenset(),
        layerwise=LayerwiseSpec(fit=distill_block, texts=lambda p: p.texts),
        reference="ProDistill, arXiv 2502.12706",
    )
)
