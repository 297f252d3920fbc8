"""WUDI merging (Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", arXiv 2503.08099), data-free.

Per Linear weight (PyTorch layout ``[out, in]``) the paper minimises the interference of the
merged task vector ``tau`` on each expert's input subspace, which it approximates by the row
space of that expert's task vector:

    L(tau) = sum_i w_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

(``w_i`` = 1 in the paper). With ``G_i = w_i tau_i^T tau_i / ||tau_i||_F^2`` (``[in, in]``,
``trace(G_i) = w_i``) this is ``sum_i tr((tau - tau_i) G_i (tau - tau_i)^T)``, quadratic in
``tau``, and guardmerge adds an optional pull toward the task-arithmetic anchor
``A = anchor_scaling * sum_i w_i tau_i``:

    L_rho(tau) = L(tau) + rho_abs ||tau - A||_F^2,    rho_abs = rho * mean(diag(sum_i G_i))

Its normal equations, solved exactly in float64 (``solver: closed_form``, the default):

    tau (sum_i G_i + rho_abs I) = sum_i tau_i G_i + rho_abs A

``rho = 0`` is the paper's exact objective. ``sum_i G_i`` then has rank at most the sum of the
task vectors' ranks, so the system is solved with :func:`.regmean.solve_right`'s ridge fallback
(``ridge * mean(diag) * I``, only when numerically singular) or, failing that, the minimum-norm
least-squares solution. When the task vectors' row spaces are mutually orthogonal, the solution
is ``sum_i tau_i``.

``solver: adam`` is the paper's own procedure, a parity option: start from ``sum_i w_i tau_i``
and run ``torch.optim.Adam`` (float32, no weight decay) on the **summed** loss above for
``steps`` steps at ``lr``. Defaults follow the reference implementations: FusionBench's
``fusion_bench/method/wudi/wudi.py`` (Adam, lr 1e-5, weight_decay 0, init = sum of the task
vectors, loss summed over tasks, ``iter_num`` 300; its shipped ``config/method/wudi/wudi.yaml``
uses 400) and the authors' repository (nathanielyvo/WUDI-Merging, ``nlp_roberta/lamassu.py``:
the same loss and init, 300 iterations, lr 2e-5 in the RoBERTa experiments).

Every other tensor (biases, LayerNorm, embeddings, heads in ``hm3`` mode) gets task arithmetic
at the anchor, ``scaling * A``. (FusionBench averages those tensors instead, i.e.
``anchor_scaling = 1/N``.) The returned task vector is ``scaling * tau``. The readable closed form
is :func:`.reference.wudi`.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field

from guardmerge.methods import params as shared
from guardmerge.methods.basic import weighted_sum
from guardmerge.methods.registry import METHODS, MethodParams, MethodSpec, Role, TensorContext, searchable
from guardmerge.methods.regmean import solve_right

log = logging.getLogger(__name__)


class WudiParams(MethodParams):
    rho: float = shared.rho(
        3.0,
        description="pull toward the task-arithmetic anchor, in units of mean(diag(sum_i G_i)); "
        "0 = the paper's exact objective",
        search=(0.0, 10.0),
    )
    anchor_scaling: float = Field(
        0.5,
        description="coefficient of the anchor A = anchor_scaling * sum_i w_i tau_i (task "
        "arithmetic); also what every non-Linear tensor gets",
        json_schema_extra=searchable(0.1, 1.5),
    )
    scaling: float = shared.scaling(1.0, search=(0.5, 1.5))
    ridge: float = shared.ridge(
        description="fallback ridge (closed form), used only when the system is numerically "
        "singular: adds ridge * mean(diag) * I before solving"
    )
    solver: Literal["closed_form", "adam"] = Field(
        "closed_form",
        description="closed_form: exact float64 solve of the normal equations; adam: the "
        "paper's procedure (Adam from sum_i w_i tau_i, float32), a parity option",
    )
    steps: int = Field(300, ge=0, description="Adam steps (solver adam only)")
    lr: float = shared.lr(1e-5, detail=" (solver adam only)")


def _active_terms(deltas: torch.Tensor, weights: torch.Tensor) -> list[tuple[torch.Tensor, float, float]]:
    """``(tau_i, w_i, w_i / ||tau_i||_F^2)`` for each expert whose task vector and weight are
    non-zero: the others contribute nothing (and would divide by zero)."""
    norms = deltas.reshape(deltas.shape[0], -1).square().sum(dim=1).tolist()
    ws = weights.tolist()
    return [(deltas[i], w, w / n2) for i, (n2, w) in enumerate(zip(norms, ws)) if n2 > 0.0 and w != 0.0]


def _loss(
    tau: torch.Tensor,
    terms: list[tuple[torch.Tensor, float, float]],
    rho_abs: float,
    anchor: torch.Tensor | None,
) -> torch.Tensor:
    loss = tau.new_zeros(())
    for tau_i, _, coeff in terms:
        loss = loss + coeff * ((tau - tau_i) @ tau_i.T).square().sum()
    if rho_abs != 0.0:
        if anchor is None:
            raise ValueError("wudi_loss: rho_abs is non-zero but no anchor was given")
        loss = loss + rho_abs * (tau - anchor).square().sum()
    return loss


def wudi_loss(
    tau: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    rho_abs: float = 0.0,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """The objective: ``sum_i w_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2`` (zero task
    vectors skipped) ``+ rho_abs ||tau - anchor||_F^2``.

    Args:
        tau: ``[out, in]`` candidate merged task vector.
        deltas: ``[N, out, in]`` task vectors.
        weights: ``[N]`` per-expert coefficients.
        rho_abs: absolute pull strength (0: the paper's loss).
        anchor: ``[out, in]`` pull target; required when ``rho_abs`` is non-zero.

    Returns:
        a scalar in ``tau``'s dtype (differentiable in ``tau``).
    """
    terms = _active_terms(deltas.to(tau.dtype), weights)
    return _loss(tau, terms, rho_abs, None if anchor is None else anchor.to(tau.dtype))


def _rho_abs(rho: float, mean_diag: float, name: str) -> float:
    """``rho * mean(diag(sum_i G_i))``, 0 when that mean is not positive (negative weights)."""
    if rho == 0.0:
        return 0.0
    if mean_diag <= 0.0:
        log.warning("WUDI on '%s': mean(diag(sum_i G_i)) = %.3g is not positive; no anchor pull", name, mean_diag)
        return 0.0
    return rho * mean_diag


def wudi_closed_form(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    rho: float = 3.0,
    anchor_scaling: float = 0.5,
    ridge: float = 1e-6,
    name: str = "",
) -> torch.Tensor:
    """Exact WUDI solve of one Linear weight, float64.

    Args:
        deltas: ``[N, out, in]`` task vectors.
        weights: ``[N]`` per-expert coefficients (they scale ``G_i``).
        rho: anchor pull in units of ``mean(diag(sum_i G_i))``; 0 = the paper's objective.
        anchor_scaling: ``A = anchor_scaling * sum_i w_i tau_i``.
        ridge: fallback ridge for a singular system (see :func:`.regmean.solve_right`).
        name: tensor name for messages.

    Returns:
        ``[out, in]`` float64 ``tau`` solving
        ``tau (sum_i G_i + rho_abs I) = sum_i tau_i G_i + rho_abs A`` (unscaled); the anchor
        when every task vector or weight is zero.
    """
    d64 = deltas.to(torch.float64)
    w64 = weights.to(device=d64.device, dtype=torch.float64)
    d_out, d_in = d64.shape[1:]
    anchor = weighted_sum(d64, anchor_scaling * w64)
    a = torch.zeros(d_in, d_in, dtype=torch.float64, device=d64.device)
    b = torch.zeros(d_out, d_in, dtype=torch.float64, device=d64.device)
    terms = _active_terms(d64, w64)
    for tau_i, _, coeff in terms:
        a.addmm_(tau_i.T, tau_i, alpha=coeff)  # G_i = coeff * tau_i^T tau_i
        if d_out <= d_in:  # tau_i G_i, in the cheaper association
            b.addmm_(tau_i @ tau_i.T, tau_i, alpha=coeff)
        else:
            b.addmm_(tau_i, tau_i.T @ tau_i, alpha=coeff)
    if not terms:
        log.info("WUDI on '%s': every task vector or weight is zero; using the anchor", name)
        return anchor
    rho_abs = _rho_abs(rho, float(torch.diagonal(a).mean()), name)
    if rho_abs > 0.0:
        a.diagonal().add_(rho_abs)
        b.add_(anchor, alpha=rho_abs)
    return solve_right(a, b, ridge, name)


def wudi_adam(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    rho: float = 3.0,
    anchor_scaling: float = 0.5,
    steps: int = 300,
    lr: float = 1e-5,
) -> torch.Tensor:
    """The paper's procedure on one Linear weight: Adam on :func:`wudi_loss`, float32.

    Starts from ``sum_i w_i tau_i`` (the paper's init) and takes ``steps`` Adam steps at ``lr``
    (no weight decay), with gradients enabled even under ``no_grad``/``inference_mode``.
    ``[N, out, in]`` x ``[N]`` -> ``[out, in]`` float32 (unscaled). ``rho_abs`` is
    ``rho * sum_i w_i / in`` (active experts), which equals ``rho * mean(diag(sum_i G_i))``
    because ``trace(G_i) = w_i``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        d32 = deltas.detach().to(torch.float32).clone()
        w32 = weights.detach().to(device=d32.device, dtype=torch.float32).clone()
        init = weighted_sum(d32, w32)
        if steps == 0:
            return init
        terms = _active_terms(d32, w32)
        if not terms:  # every task vector or weight is zero: nothing to optimise
            return init
        rho_abs = _rho_abs(rho, sum(w for _, w, _ in terms) / d32.shape[2], "")
        anchor = anchor_scaling * init
        tau = init.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([tau], lr=lr, weight_decay=0.0)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(tau, terms, rho_abs, anchor)
            loss.backward()
            optimizer.step()
        return tau.detach()


def wudi(deltas: torch.Tensor, weights: torch.Tensor, params: WudiParams, ctx: TensorContext) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: ``scaling * tau`` (WUDI) for a Linear weight
    (``ctx.role`` LINEAR_WEIGHT, ``[N, out, in]``), ``scaling * anchor_scaling * sum_i w_i tau_i``
    for every other tensor; in ``deltas``' dtype."""
    if ctx.role != Role.LINEAR_WEIGHT or deltas.dim() != 3:
        return weighted_sum(deltas, (params.scaling * params.anchor_scaling) * weights)
    if params.solver == "adam":
        tau = wudi_adam(
            deltas, weights, rho=params.rho, anchor_scaling=params.anchor_scaling, steps=params.steps, lr=params.lr
        )
    else:
        tau = wudi_closed_form(
            deltas, weights, rho=params.rho, anchor_scaling=params.anchor_scaling, ridge=params.ridge, name=ctx.name
        )
    return (params.scaling * tau).to(device=deltas.device, dtype=deltas.dtype)


METHODS.register(
    MethodSpec(
        name="wudi",
        fn=wudi,
        params=WudiParams,
        summary="WUDI: data-free least squares on each Linear weight against the task vectors' own row "
        "spaces, pulled toward task arithmetic (rho); task arithmetic elsewhere.",
        needs=frozenset(),
        reference="Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding "
        "Data-Free Model Merging via Task Vectors (arXiv 2503.08099)",
    )
)
