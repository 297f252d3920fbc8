"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models").

Per tensor, with k experts: ``cos`` = the mean pairwise cosine of the task vectors
``tau_i = theta_i - theta_0`` (flattened), ``t = k * cos / ((k - 1) * cos + 1)``, and
``theta = t * mean_i theta_i + (1 - t) * theta_0``, i.e. the merged task vector is
``t * mean_i tau_i`` (weighted mean with the config's per-expert weights; uniform by default).

The readable whole-tensor version is :func:`.reference.model_stock`.

Guards: k = 1 gives t = 1 (the expert itself; no pair to measure). A pair with a zero task
vector has cosine 0. ``cos`` is clamped to [0, 1], so ``t`` is in [0, 1] (the paper's regime;
a negative mean cosine means no shared direction and gives ``theta_0``; mergekit does not clamp,
and its ``t`` has a pole at ``cos = -1/(k-1)``).
"""

from __future__ import annotations

import torch

from guardmerge.methods import params as shared
from guardmerge.methods.registry import METHODS, MethodParams, MethodSpec, TensorContext

_CHUNK = 1 << 20


class ModelStockParams(MethodParams):
    scaling: float = shared.scaling(1.0, description="lambda, a coefficient on the merged task vector (1 = the paper)")


def mean_pairwise_cosine(deltas: torch.Tensor) -> torch.Tensor:
    """Scalar mean cosine over the ``k (k - 1) / 2`` pairs of rows of ``[k, *shape]``.

    Computed in float64; a pair involving a zero vector counts as 0. Needs ``k >= 2``.
    """
    k = deltas.shape[0]
    if k < 2:
        raise ValueError("a pairwise cosine needs at least two task vectors")
    rows = deltas.reshape(k, -1)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for start in range(0, rows.shape[1], _CHUNK):  # float64 without a float64 copy of it all
        part = rows[:, start : start + _CHUNK].to(torch.float64)
        gram += part @ part.T
    norms = gram.diagonal().sqrt()
    denom = norms.unsqueeze(0) * norms.unsqueeze(1)
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), 0.0)
    upper = torch.triu_indices(k, k, offset=1)
    return cos[upper[0], upper[1]].clamp(-1.0, 1.0).mean()


def interpolation_ratio(cos: torch.Tensor | float, k: int) -> float:
    """``t = k cos / ((k - 1) cos + 1)`` with ``cos`` clamped to [0, 1]; 1 for ``k = 1``."""
    if k == 1:
        return 1.0
    c = min(max(float(cos), 0.0), 1.0)
    return k * c / ((k - 1) * c + 1.0)


def model_stock(
    deltas: torch.Tensor, weights: torch.Tensor, params: ModelStockParams, ctx: TensorContext
) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: ``scaling * t * sum_i w_i tau_i / sum_i w_i``."""
    total = float(weights.sum())
    if total == 0.0:
        raise ValueError(f"model_stock of '{ctx.name}': expert weights sum to 0")
    k = deltas.shape[0]
    t = interpolation_ratio(mean_pairwise_cosine(deltas) if k > 1 else 1.0, k)
    mean = torch.tensordot(weights.to(deltas.dtype), deltas, dims=1)  # no [N, *shape] temporary
    return (params.scaling * t / total) * mean


METHODS.register(
    MethodSpec(
        name="model_stock",
        fn=model_stock,
        params=ModelStockParams,
        summary="Model Stock: per tensor, t from the mean pairwise cosine of the task vectors; "
        "theta_0 + t * mean_i tau_i.",
        needs=frozenset(),
        reference="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models",
    )
)
