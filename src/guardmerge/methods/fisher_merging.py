"""Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging").

Each parameter is averaged with the experts' diagonal Fisher as weights:

    theta[p] = sum_i w_i (F_i[p] + eps) theta_i[p] / sum_i w_i (F_i[p] + eps)

which, since the weights sum to one per coordinate, is in task-vector form
``delta[p] = sum_i w_i (F_i[p] + eps) tau_i[p] / sum_i w_i (F_i[p] + eps)`` (times ``scaling``).
With ``normalize`` each expert's Fisher is first divided by its L2 norm over the whole model
(computed once by the method's ``prepare`` pass), so an expert with larger gradients overall does
not dominate. Tensors without a Fisher get the weighted plain average. The readable version is
:func:`.reference.fisher`.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from guardmerge.errors import StatisticsError
from guardmerge.methods import params as shared
from guardmerge.methods.registry import METHODS, MethodParams, MethodSpec, StreamFactory, TensorContext
from guardmerge.methods.regmean import weighted_mean

log = logging.getLogger(__name__)

NORM_KEY = "fisher_norm"
"""``ctx.globals`` key of the per-expert global Fisher norms ``[N]`` (``normalize`` only)."""


class FisherParams(MethodParams):
    eps: float = Field(1e-6, ge=0.0, description="added to every Fisher entry (a floor, avoids 0/0)")
    normalize: bool = Field(
        False,
        description="divide each expert's Fisher by its L2 norm over all tensors before merging",
    )
    scaling: float = shared.scaling(1.0, search=(0.5, 2.0))


def fisher_norms(params: FisherParams, stream: StreamFactory) -> dict[str, torch.Tensor]:
    """``prepare`` hook: ``{"fisher_norm": [N]}``, each expert's Fisher L2 norm over all tensors
    (only with ``normalize``; otherwise nothing is read)."""
    if not params.normalize:
        return {}
    total: torch.Tensor | None = None
    for ctx, _deltas in stream():
        fisher = ctx.stats.get("fisher")
        if fisher is None:
            continue
        sq = fisher.to(torch.float64).reshape(fisher.shape[0], -1).square().sum(dim=1).cpu()
        total = sq if total is None else total + sq
    if total is None:
        raise StatisticsError("Fisher normalisation: no tensor carries Fisher statistics")
    return {NORM_KEY: total.sqrt()}


def fisher_merge(
    deltas: torch.Tensor,
    fisher: torch.Tensor,
    weights: torch.Tensor,
    *,
    eps: float = 1e-6,
    norms: torch.Tensor | None = None,
    name: str = "",
) -> torch.Tensor:
    """Fisher-weighted average of one tensor, float64.

    Args:
        deltas: ``[N, *shape]`` task vectors.
        fisher: ``[N, *shape]`` diagonal Fishers.
        weights: ``[N]`` per-expert coefficients.
        eps: added to every Fisher entry.
        norms: ``[N]`` per-expert divisors of the Fisher (global norms), or ``None``.
        name: tensor name for messages.

    Returns:
        ``[*shape]``: ``sum_i w_i (F_i + eps) tau_i / sum_i w_i (F_i + eps)``; coordinates where
        the denominator is 0 get the weighted plain average.
    """
    if fisher.shape != deltas.shape:
        raise StatisticsError(
            f"Fisher merge of '{name}': Fisher shape {tuple(fisher.shape)} "
            f"differs from the task vectors' {tuple(deltas.shape)}"
        )
    n = deltas.shape[0]
    view = (n,) + (1,) * (deltas.dim() - 1)
    f = fisher.to(device=deltas.device, dtype=torch.float64)
    if norms is not None:
        nrm = norms.to(device=f.device, dtype=torch.float64)
        nrm = torch.where(nrm > 0, nrm, torch.ones_like(nrm))
        f = f / nrm.reshape(view)
    coef = (f + eps) * weights.to(device=f.device, dtype=torch.float64).reshape(view)
    den = coef.sum(dim=0)
    num = (coef * deltas.to(torch.float64)).sum(dim=0)
    safe = den != 0
    merged = num / torch.where(safe, den, torch.ones_like(den))
    if not bool(safe.all()):
        fallback = weighted_mean(deltas.to(torch.float64), weights, name)
        merged = torch.where(safe, merged, fallback)
    return merged


def fisher(deltas: torch.Tensor, weights: torch.Tensor, params: FisherParams, ctx: TensorContext) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: Fisher-weighted average using ``ctx.stats["fisher"]``
    (``[N, *shape]``), the weighted plain average where none is given; times ``scaling``."""
    f = ctx.stats.get("fisher")
    if f is None:
        return params.scaling * weighted_mean(deltas, weights, ctx.name)
    norms = None
    if params.normalize:
        norms = ctx.globals.get(NORM_KEY)
        if norms is None:
            raise StatisticsError(
                f"Fisher merge of '{ctx.name}' with normalize=true: the global Fisher norms "
                "are missing (the method's prepare pass did not run)"
            )
    merged = fisher_merge(deltas, f, weights, eps=params.eps, norms=norms, name=ctx.name)
    return (params.scaling * merged).to(dtype=deltas.dtype)


SPEC = METHODS.register(
    MethodSpec(
        name="fisher",
        fn=fisher,
        params=FisherParams,
        summary="Fisher merging: per-parameter average weighted by each expert's diagonal Fisher.",
        needs=frozenset({"fisher"}),
        prepare=fisher_norms,
        reference="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging",
    )
)
