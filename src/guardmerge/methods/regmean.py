"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

Per Linear layer, with ``X_i`` the inputs expert ``i`` sees on its own data and ``G_i`` their mean
Gram ``X_i^T X_i / n_i`` (``[in, in]``), RegMean minimises ``sum_i w_i ||X_i W - X_i W_i||^2``:
``W* = (sum_i w_i G_i)^-1 sum_i w_i G_i W_i``. PyTorch's ``nn.Linear.weight`` is
``[out, in] = W^T``, and in task-vector form (``theta_i = theta_0 + tau_i``)

    delta* = (sum_i w_i tau_i G~_i) (sum_i w_i G~_i)^-1,   G~_i = alpha G_i + (1 - alpha) diag(G_i)

(``theta_0`` cancels: ``(sum_i w_i (theta_0 + tau_i) G_i)(sum_i w_i G_i)^-1 = theta_0 + delta*``).
The system is **solved** (Cholesky, float64), never inverted; if it is numerically singular
(fewer rows than features, e.g. a pooler Gram from a few hundred examples) a ridge
``ridge * mean(diag) * I`` is added, and only then. Tensors without a Gram (biases, LayerNorm,
embeddings) get the weighted plain average of the task vectors. The readable version (a regular
system assumed) is :func:`.reference.regmean`.
"""

from __future__ import annotations

import logging

import torch

from guardmerge.errors import StatisticsError
from guardmerge.methods import params as shared
from guardmerge.methods.basic import weighted_sum
from guardmerge.methods.registry import METHODS, MethodParams, MethodSpec, TensorContext

log = logging.getLogger(__name__)

SINGULAR_RCOND = 1e-12
"""A Cholesky pivot below ``SINGULAR_RCOND * max pivot`` counts as singular (cond >= 1e12)."""


class RegMeanParams(MethodParams):
    alpha: float = shared.alpha(search=(0.0, 1.0))
    ridge: float = shared.ridge()
    scaling: float = shared.scaling(1.0)


def weighted_mean(deltas: torch.Tensor, weights: torch.Tensor, name: str = "") -> torch.Tensor:
    """``sum_i w_i tau_i / sum_i w_i``: ``[N, *shape]`` x ``[N]`` -> ``[*shape]``."""
    total = float(weights.sum())
    if total == 0.0:
        raise ValueError(f"weighted mean of '{name}': expert weights sum to 0")
    return weighted_sum(deltas, weights) / total


def shrink_grams(grams: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * G + (1 - alpha) * diag(G)`` over ``[..., in, in]``."""
    if alpha == 1.0:
        return grams
    diag = torch.diag_embed(torch.diagonal(grams, dim1=-2, dim2=-1))
    return alpha * grams + (1.0 - alpha) * diag


def _cholesky_if_regular(a: torch.Tensor) -> torch.Tensor | None:
    """The Cholesky factor of ``a`` if it is positive definite and not numerically singular."""
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return None
    pivots = torch.diagonal(factor).square()
    if not bool(torch.isfinite(pivots).all()) or float(pivots.min()) <= SINGULAR_RCOND * float(pivots.max()):
        return None
    return factor


def solve_right(a: torch.Tensor, b: torch.Tensor, ridge: float, name: str = "") -> torch.Tensor:
    """``X`` with ``X a = b``: ``a`` ``[in, in]`` symmetric PSD, ``b`` ``[out, in]``, float64.

    Solved as ``a^T X^T = b^T`` by Cholesky; a singular ``a`` gets ``ridge * mean(diag(a)) * I``
    added; if that is still not positive definite (negative weights, ``ridge`` 0), the
    minimum-norm least-squares solution.
    """
    scale = float(torch.diagonal(a).mean())
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        raise StatisticsError(f"RegMean on '{name}': non-finite Gram or task vector")
    factor = _cholesky_if_regular(a)
    if factor is not None:
        return torch.cholesky_solve(b.T, factor).T
    if ridge > 0 and scale > 0:
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        factor, info = torch.linalg.cholesky_ex(a + (ridge * scale) * eye)
        if int(info) == 0:
            log.info("RegMean on '%s': Gram sum singular, solved with ridge %.3g * mean(diag)", name, ridge)
            return torch.cholesky_solve(b.T, factor).T
    log.warning(
        "RegMean on '%s': Gram sum singular and the ridge did not help; using the minimum-norm least-squares solution",
        name,
    )
    solution = torch.linalg.lstsq(a.T.cpu(), b.T.cpu(), driver="gelsd").solution
    return solution.T.to(a.device)


def regmean_merge(
    deltas: torch.Tensor,
    grams: torch.Tensor,
    weights: torch.Tensor,
    *,
    alpha: float = 1.0,
    ridge: float = 1e-6,
    name: str = "",
) -> torch.Tensor:
    """RegMean of one Linear weight, float64.

    Args:
        deltas: ``[N, out, in]`` task vectors (``weight_i - weight_0``).
        grams: ``[N, in, in]`` per-expert mean Grams of the layer's input.
        weights: ``[N]`` per-expert coefficients; they scale the Grams.
        alpha: off-diagonal shrink (1 = exact RegMean).
        ridge: fallback ridge for a singular Gram sum.
        name: tensor name for messages.

    Returns:
        ``[out, in]`` float64: ``(sum_i w_i tau_i G~_i)(sum_i w_i G~_i)^-1`` (the weighted
        average if the Gram sum is zero: the layer never saw a non-zero input).
    """
    if deltas.dim() != 3 or grams.dim() != 3:
        raise StatisticsError(
            f"RegMean on '{name}': expected deltas [N, out, in] and grams "
            f"[N, in, in], got {tuple(deltas.shape)} and {tuple(grams.shape)}"
        )
    n, _, d_in = deltas.shape
    if grams.shape != (n, d_in, d_in):
        raise StatisticsError(
            f"RegMean on '{name}': Gram shape {tuple(grams.shape)} does not "
            f"match the weight's input size {d_in} for {n} experts"
        )
    g = shrink_grams(grams.to(torch.float64), alpha)
    w = weights.to(device=g.device, dtype=torch.float64).reshape(n, 1, 1)
    gw = g * w
    a = gw.sum(dim=0)  # [in, in]
    if float(torch.diagonal(a).sum()) <= 0.0:
        log.warning(
            "RegMean on '%s': the weighted Gram sum is zero (no input signal); using the weighted average", name
        )
        return weighted_mean(deltas.to(torch.float64), weights, name).to(g.device)
    b = torch.einsum("noi,nij->oj", deltas.to(device=g.device, dtype=torch.float64), gw)
    return solve_right(a, b, ridge, name)


def regmean(deltas: torch.Tensor, weights: torch.Tensor, params: RegMeanParams, ctx: TensorContext) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: RegMean where ``ctx.stats["gram"]`` (``[N, in, in]``) is
    given for a 2-D weight, the weighted plain average otherwise; times ``scaling``."""
    grams = ctx.stats.get("gram")
    if grams is None or deltas.dim() != 3:
        return params.scaling * weighted_mean(deltas, weights, ctx.name)
    merged = regmean_merge(deltas, grams, weights, alpha=params.alpha, ridge=params.ridge, name=ctx.name)
    return (params.scaling * merged).to(device=deltas.device, dtype=deltas.dtype)


SPEC = METHODS.register(
    MethodSpec(
        name="regmean",
        fn=regmean,
        params=RegMeanParams,
        summary="RegMean: closed-form merge of each Linear weight from the Grams of its inputs; "
        "plain average elsewhere.",
        needs=frozenset({"gram"}),
        reference="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models",
    )
)
