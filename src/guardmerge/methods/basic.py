"""Weighted average (model soup), and the weighted sum every linear merge builds on.

- Average (Wortsman et al. 2022, "Model soups"): ``theta = sum_i w_i theta_i / sum_i w_i``,
  i.e. the merged task vector is ``sum_i w_i tau_i / sum_i w_i``.

Task arithmetic (Ilharco et al. 2023, ``theta_0 + scaling * sum_i w_i tau_i``) is the first row
of the sparsify x consensus table in :mod:`.ties` (no sparsify step, no consensus).
"""

from __future__ import annotations

import torch

from guardmerge.methods.registry import METHODS, MethodParams, MethodSpec, TensorContext


def weighted_sum(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i tau_i``: ``[N, *shape]`` x ``[N]`` -> ``[*shape]``."""
    # one matrix-vector product: a single pass over the task vectors, no [N, *shape] temporary.
    # (A chain of add_(row, alpha=w) is ~1.7x faster on this CPU but rounds through fused
    # multiply-adds: it would change every committed result by an ulp and lose mergekit parity.)
    return (weights.to(deltas.dtype) @ deltas.reshape(deltas.shape[0], -1)).reshape(deltas.shape[1:])


class AverageParams(MethodParams):
    pass


def average(deltas: torch.Tensor, weights: torch.Tensor, params: AverageParams, ctx: TensorContext) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: ``sum_i w_i tau_i / sum_i w_i``."""
    total = weights.sum()
    if float(total) == 0.0:
        raise ValueError(f"average of '{ctx.name}': expert weights sum to 0")
    return weighted_sum(deltas, weights) / total.to(deltas.dtype)


METHODS.register(
    MethodSpec(
        name="average",
        fn=average,
        params=AverageParams,
        summary="Weighted average of the experts' weights (model soup); weights are normalised to sum 1.",
        needs=frozenset(),
        reference="Wortsman et al. 2022, Model soups",
    )
)
