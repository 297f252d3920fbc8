"""Readable whole-tensor reference implementations of guardmerge's per-tensor merges.

Each function takes the task vectors of one tensor stacked over experts, ``deltas``
``[N, *shape]`` (``tau_i = theta_i - theta_0``), and per-expert ``weights`` ``[N]``, and returns
the merged task vector ``[*shape]`` (``theta = theta_0 + result``), step by step as the paper
states it (peft's ``utils/merge_utils.py`` is the model); docs/algorithms.md is the specification.
Top-k and quantiles rank each expert's entries within the tensor given: the ``global`` scope of
the registered methods is the same function applied to the flattened model.

This module is the specification in code; the merge pipeline never calls it. The registered
methods compute the same results in column chunks (:mod:`guardmerge.methods.fast`), with fused
numba kernels where installed, and ``tests/methods`` checks them against the functions here: bit
for bit where both do the same float operations in the same order, to rounding where the fast
path sums in another order (BLAS products, float64 partial sums).
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Generator, Tensor

from guardmerge.methods.params import Consensus, RescaleBy

# ----------------------------------------------------------------------------------- helpers


def per_expert(values: Tensor, like: Tensor) -> Tensor:
    """``[N]`` -> ``[N, 1, ...]`` in ``like``'s dtype, to broadcast over ``like`` ``[N, *shape]``."""
    return values.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def floor_of(n: int, fraction: float | Fraction) -> int:
    """``floor(fraction * n)`` with the decimal value of ``fraction`` (``0.29 * 100`` is 29)."""
    return int((fraction if isinstance(fraction, Fraction) else Fraction(str(fraction))) * n)


def weighted_sum(deltas: Tensor, weights: Tensor) -> Tensor:
    """``sum_i w_i tau_i``: ``[N, *shape]`` x ``[N]`` -> ``[*shape]``."""
    return (per_expert(weights, deltas) * deltas).sum(0)


def descending_ranks(deltas: Tensor) -> Tensor:
    """``[N, *shape]`` int64: each entry's 0-based rank by ``|tau_i|``, largest first, per expert;
    of equal magnitudes the earlier entry (row-major) ranks first."""
    flat = deltas.reshape(deltas.shape[0], -1).abs()
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[1]).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions).view(deltas.shape)


# ------------------------------------------------------------------ average, task arithmetic


def average(deltas: Tensor, weights: Tensor) -> Tensor:
    """Model soup (Wortsman et al. 2022): ``sum_i w_i tau_i / sum_i w_i``."""
    return weighted_sum(deltas, weights) / weights.sum().to(deltas.dtype)


def task_arithmetic(deltas: Tensor, weights: Tensor, scaling: float = 0.3) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``scaling * sum_i w_i tau_i``."""
    return scaling * weighted_sum(deltas, weights)


# ------------------------------------------------------------------------------------- TIES


def weighted(sparse: Tensor, weights: Tensor) -> Tensor:
    """``w_i t_i``: ``[N, *shape]`` x ``[N]`` -> ``[N, *shape]`` (the weights multiply the sparsified
    task vectors before the election, mergekit's convention)."""
    return per_expert(weights, sparse) * sparse


def total_mass(weighted: Tensor) -> Tensor:
    """Scalar float64 sum of every ``w_i t_i`` (the election's fallback sign)."""
    return weighted.sum(dtype=torch.float64)


def trim(deltas: Tensor, density: float) -> Tensor:
    """TIES step 1 (Yadav et al. 2023): per expert keep the ``floor(density * n)`` entries of
    largest ``|tau_i|`` (of equal ones, the earlier), zero the rest: ``[N, *shape]``."""
    keep = floor_of(deltas[0].numel(), density)
    return deltas * (descending_ranks(deltas) < keep)


def elect_sign(weighted: Tensor, mass: Tensor | float | None = None) -> Tensor:
    """TIES step 2: ``gamma = sign(sum_i w_i t_i)`` in {-1, +1}, ``[*shape]``.

    Where the sum is exactly 0, ``gamma`` is the sign of ``mass``, the total of every ``w_i t_i``
    over the scope (this tensor's when ``None``), and +1 where that is 0 too.
    """
    total = weighted.sum(0)
    mass = total_mass(weighted) if mass is None else mass
    fallback = -1.0 if float(mass) < 0 else 1.0
    return torch.where(total > 0, 1.0, torch.where(total < 0, -1.0, fallback)).to(weighted.dtype)


def disjoint_merge(weighted: Tensor, weights: Tensor, gamma: Tensor, mode: Consensus = "mean") -> Tensor:
    """TIES step 3: aggregate the ``w_i t_i`` whose sign is ``gamma``: ``[N, *shape]`` -> ``[*shape]``.

    ``sum``: their sum; ``mean``: their sum over the sum of their weights ``w_i`` (1 where no
    entry agrees), i.e. with unit weights the mean of the agreeing entries.
    """
    agree = torch.sign(weighted) == gamma
    merged = (weighted * agree).sum(0)
    if mode == "sum":
        return merged
    if mode != "mean":
        raise ValueError(f"unknown consensus mode '{mode}'")
    divisor = (per_expert(weights, weighted) * agree).sum(0)
    return merged / torch.where(divisor == 0, 1.0, divisor)


def ties_consensus(
    sparse: Tensor, weights: Tensor, mode: Consensus = "mean", mass: Tensor | float | None = None
) -> Tensor:
    """TIES steps 2-3 on sparsified task vectors ``t_i`` ``[N, *shape]`` -> ``[*shape]``: elect on
    the weighted ``w_i t_i``, then merge them disjointly."""
    wt = weighted(sparse, weights)
    return disjoint_merge(wt, weights, elect_sign(wt, mass), mode)


def ties(
    deltas: Tensor, weights: Tensor, density: float = 0.2, scaling: float = 1.0, consensus: Consensus = "mean"
) -> Tensor:
    """TIES-Merging: trim, elect, disjoint merge; ``scaling * tau_m``."""
    return scaling * ties_consensus(trim(deltas, density), weights, consensus)


# ------------------------------------------------------------------------------------- DARE


def dare_keep(generator: Generator, experts: int, count: int, density: float) -> Tensor:
    """Bool ``[N, count]``: each entry kept with probability ``density``. Expert i draws
    ``torch.rand(count) < density`` from its own generator, seeded from ``generator``."""
    seeds = torch.randint(0, 2**62, (experts,), generator=generator).tolist()
    draws = [torch.rand(count, generator=Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(draws) < density


def dare(
    deltas: Tensor, density: float, generator: Generator, rescale: bool = True, rescale_by: RescaleBy = "density"
) -> Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability ``p = 1 - density``, then rescale
    the survivors: times ``1 / (1 - p)`` (``density``, the paper), or per expert so that its L1
    norm is kept (``l1``, mergekit 0.1.5; not where either norm is below 1e-7). ``[N, *shape]``."""
    if density >= 1.0:
        return deltas
    rows = deltas.reshape(deltas.shape[0], -1)
    dropped = rows * dare_keep(generator, rows.shape[0], rows.shape[1], density)
    if not rescale:
        return dropped.view(deltas.shape)
    if rescale_by == "density":
        factor = torch.full((rows.shape[0],), 1.0 / density, dtype=torch.float64)
    else:
        before, after = rows.abs().sum(1, dtype=torch.float64), dropped.abs().sum(1, dtype=torch.float64)
        ok = (before >= 1e-7) & (after >= 1e-7)
        factor = torch.where(ok, before / torch.where(ok, after, 1.0), 1.0)
    return (dropped * factor.to(rows.dtype).unsqueeze(1)).view(deltas.shape)


def dare_linear(deltas: Tensor, weights: Tensor, density: float, generator: Generator, scaling: float = 0.3) -> Tensor:
    """DARE, then task arithmetic: ``scaling * sum_i w_i dare(tau_i)``."""
    return task_arithmetic(dare(deltas, density, generator), weights, scaling)


def dare_ties(
    deltas: Tensor, weights: Tensor, density: float, generator: Generator, scaling: float, consensus: Consensus = "mean"
) -> Tensor:
    """DARE-TIES (mergekit's flavour): DARE's drop replaces TIES' trim, then elect and disjoint merge."""
    return scaling * ties_consensus(dare(deltas, density, generator), weights, consensus)


# ------------------------------------------------------------------------------ breadcrumbs


def breadcrumbs_mask(deltas: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023), bool ``[N, *shape]``: per expert drop the
    ``floor(gamma * n)`` largest ``|tau_i|`` and the smallest, keeping ``floor(density * n)``
    (ranks ``[n_top, n_top + n_keep)``, largest first); where both do not fit, density wins."""
    n = deltas[0].numel()
    n_keep = floor_of(n, density)
    n_top = min(floor_of(n, gamma), n - n_keep)
    ranks = descending_ranks(deltas)
    return (ranks >= n_top) & (ranks < n_top + n_keep)


def breadcrumbs(deltas: Tensor, weights: Tensor, density: float, gamma: float, scaling: float = 0.3) -> Tensor:
    """Breadcrumbs, then task arithmetic: ``scaling * sum_i w_i crumbs(tau_i)``."""
    return task_arithmetic(deltas * breadcrumbs_mask(deltas, density, gamma), weights, scaling)


def breadcrumbs_ties(
    deltas: Tensor, weights: Tensor, density: float, gamma: float, scaling: float = 1.0, consensus: Consensus = "mean"
) -> Tensor:
    """Breadcrumbs, then TIES' election and disjoint merge."""
    sparse = deltas * breadcrumbs_mask(deltas, density, gamma)
    return scaling * ties_consensus(sparse, weights, consensus)


# -------------------------------------------------------------------------------------- PCB


def minmax(x: Tensor) -> Tensor:
    """Each row of ``x`` ``[N, d]`` mapped to [0, 1] by its own min and max (0 for a constant row)."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


def pcb(
    deltas: Tensor, weights: Tensor, density: float = 0.1, scaling: float = 1.0, clip: float = 0.01, inter: str = "tanh"
) -> Tensor:
    """PCB-merging (Du et al. 2024) over the flattened tensor: ``scaling * tau_m``.

    Quantiles follow the authors' sort-based indexing: the ``q``-quantile of ``d`` values is
    ``sorted[floor(d q)]``, the upper clip ``sorted[floor(d (1 - q)) - 1]``.
    """
    n, rows = deltas.shape[0], deltas.reshape(deltas.shape[0], -1)
    d = rows.shape[1]
    # 1. clamp |tau_i| at its clip / 1 - clip quantiles; tau'_i = sign(tau_i) * a_i is merged
    ordered = rows.abs().sort(dim=1).values
    lo = ordered[:, min(floor_of(d, clip), d - 1)]
    hi = torch.maximum(ordered[:, max(floor_of(d, 1 - Fraction(str(clip))) - 1, 0)], lo)
    a = torch.clamp(rows.abs(), lo.unsqueeze(1), hi.unsqueeze(1))
    clipped = torch.sign(rows) * a
    # 2. intra-balancing: s_i = exp(N * MinMax(a_i)^2), its max (e^N) divided out
    s = torch.exp(n * (minmax(a) ** 2 - 1.0))
    # 3. inter-balancing: tanh(tau_i * sum_j tau_j), or the paper's sum_j softmax(Norm(tau_i * tau_j))
    if inter == "softmax":
        c = sum(torch.softmax(minmax(rows * rows[j]), dim=1) for j in range(n))
    else:
        c = torch.tanh(rows * rows.sum(0))
    beta = s * c
    # 4. keep the top density fraction of beta_i, min-max weighted; 0 at or below the cut
    cut = beta.sort(dim=1).values[:, min(floor_of(d, 1 - Fraction(str(density))), d - 1)].unsqueeze(1)
    top = beta.amax(1, keepdim=True)
    w = torch.where(beta > cut, ((beta - cut) / torch.where(top > cut, top - cut, 1.0)).clamp(0.0, 1.0), 0.0)
    # 5. tau_m = sum_i e_i w_i tau'_i / max(sum_i w_i, 1e-12), e_i the per-expert weights
    merged = (per_expert(weights, rows) * w * clipped).sum(0) / w.sum(0).clamp_min(1e-12)
    return (scaling * merged).view(deltas.shape[1:])


# ------------------------------------------------------------------------------ model stock


def model_stock(deltas: Tensor, weights: Tensor, scaling: float = 1.0) -> Tensor:
    """Model Stock (Jang et al. 2024): ``t * mean_i tau_i`` with ``t = k cos / ((k - 1) cos + 1)``,
    ``cos`` the mean pairwise cosine of the k task vectors clamped to [0, 1] (``t = 1`` for one)."""
    k = deltas.shape[0]
    t = 1.0
    if k > 1:
        flat = deltas.reshape(k, -1).double()
        norms = flat.norm(dim=1, keepdim=True)
        unit = flat / torch.where(norms > 0, norms, 1.0)  # a zero vector has cosine 0 with any other
        pairs = torch.triu_indices(k, k, offset=1)
        cos = float((unit @ unit.T)[pairs[0], pairs[1]].mean().clamp(0.0, 1.0))
        t = k * cos / ((k - 1) * cos + 1.0)
    return scaling * t * average(deltas, weights)


# --------------------------------------------------------------- RegMean, Fisher, WUDI (solves)


def regmean(deltas: Tensor, grams: Tensor, weights: Tensor, alpha: float = 1.0) -> Tensor:
    """RegMean (Jin et al. 2023) of one Linear weight, float64: ``deltas`` ``[N, out, in]``,
    ``grams`` ``[N, in, in]``; ``(sum_i w_i tau_i G~_i)(sum_i w_i G~_i)^-1`` with
    ``G~_i = alpha G_i + (1 - alpha) diag(G_i)`` (a regular Gram sum assumed)."""
    g = grams.double()
    shrunk = alpha * g + (1 - alpha) * torch.diag_embed(torch.diagonal(g, dim1=-2, dim2=-1))
    w = per_expert(weights, shrunk)
    a = (w * shrunk).sum(0)
    b = (w * deltas.double() @ shrunk).sum(0)
    return torch.linalg.solve(a, b.T).T  # X a = b, a symmetric


def fisher(deltas: Tensor, fishers: Tensor, weights: Tensor, eps: float = 1e-6) -> Tensor:
    """Fisher merging (Matena & Raffel 2022), float64:
    ``sum_i w_i (F_i + eps) tau_i / sum_i w_i (F_i + eps)``, ``fishers`` ``[N, *shape]``."""
    coef = per_expert(weights, fishers.double()) * (fishers.double() + eps)
    return (coef * deltas.double()).sum(0) / coef.sum(0)


def wudi(
    deltas: Tensor, weights: Tensor, rho: float = 3.0, anchor_scaling: float = 0.5, scaling: float = 1.0
) -> Tensor:
    """WUDI (Cheng et al. 2025) of one Linear weight ``[N, out, in]``, float64: ``scaling * tau``
    with ``tau (sum_i G_i + rho_abs I) = sum_i tau_i G_i + rho_abs A``, ``G_i = w_i tau_i^T tau_i
    / ||tau_i||_F^2``, ``A = anchor_scaling * sum_i w_i tau_i``, ``rho_abs = rho * mean(diag(sum_i
    G_i))`` (non-zero task vectors, a regular system assumed)."""
    taus = deltas.double()
    grams = torch.stack([w * t.T @ t / t.square().sum() for t, w in zip(taus, weights.tolist())])
    a = grams.sum(0)
    anchor = anchor_scaling * weighted_sum(taus, weights)
    rho_abs = rho * float(torch.diagonal(a).mean())
    b = (taus @ grams).sum(0) + rho_abs * anchor
    tau = torch.linalg.solve(a + rho_abs * torch.eye(a.shape[0], dtype=a.dtype), b.T).T
    return scaling * tau
