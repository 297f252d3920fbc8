"""Sign election and disjoint aggregation (Yadav et al. 2023, "TIES-Merging", steps 2 and 3).

Inputs are the *weighted* (sparsified) task vectors of one tensor, ``w_i * t_i`` stacked as
``[N, *shape]``: per-expert weights multiply the trimmed task vectors before the election, as in
mergekit.

- Election: ``gamma = sign(sum_i w_i t_i)``. Where that sum is exactly 0, ``gamma`` is the sign
  of the total mass ``M = sum_p sum_i w_i t_i[p]`` over the selection scope (the tensor, or the
  whole model for ``scope: global``), and +1 where ``M`` is 0 too. (The TIES reference code
  uses the sign of the sum of the elected signs instead; where the sum is 0 the choice only
  matters for entries that cancel exactly.)
- Disjoint ``mean`` (TIES): ``sum_{i in S} w_i t_i / sum_{i in S} w_i`` with
  ``S = {i : sign(w_i t_i[p]) = gamma[p]}``; a zero divisor is replaced by 1. With unit weights
  this is the mean over the agreeing, non-zero entries (count at least 1).
- Disjoint ``sum``: ``sum_{i in S} w_i t_i`` (mergekit's ``normalize: false``).
"""

from __future__ import annotations

from typing import Literal

import torch

Consensus = Literal["mean", "sum"]


def weighted(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``w_i * t_i``: ``[N, *shape]`` x ``[N]`` -> ``[N, *shape]``."""
    return deltas * _expand(weights, deltas)


def _expand(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weights.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def total_mass(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """Scalar float64 ``sum`` of every entry (the election's fallback, see module doc)."""
    return weighted_deltas.sum(dtype=torch.float64)


def elect_sign(weighted_deltas: torch.Tensor, mass: torch.Tensor | float) -> torch.Tensor:
    """``gamma`` ``[*shape]`` in {-1, +1}: sign of the sum over experts, else sign of ``mass``."""
    total = weighted_deltas.sum(0)
    fallback = -1.0 if float(mass) < 0 else 1.0
    gamma = torch.sign(total)
    return torch.where(total == 0, torch.full_like(gamma, fallback), gamma)


def disjoint_merge(
    weighted_deltas: torch.Tensor,
    weights: torch.Tensor,
    gamma: torch.Tensor,
    mode: Consensus = "mean",
) -> torch.Tensor:
    """Aggregate the entries agreeing with ``gamma``: ``[N, *shape]`` -> ``[*shape]``."""
    agree = torch.sign(weighted_deltas) == gamma.unsqueeze(0)
    merged = (weighted_deltas * agree).sum(0)
    if mode == "sum":
        return merged
    if mode != "mean":
        raise ValueError(f"unknown consensus mode '{mode}'")
    divisor = (_expand(weights, weighted_deltas) * agree).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return merged / divisor


def ties_consensus(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    mode: Consensus = "mean",
    mass: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Steps 2-3 of TIES on sparsified task vectors ``[N, *shape]`` -> ``[*shape]``.

    ``mass`` is the election fallback's total mass over the scope; ``None`` uses this tensor's.
    """
    wd = weighted(deltas, weights)
    gamma = elect_sign(wd, total_mass(wd) if mass is None else mass)
    return disjoint_merge(wd, weights, gamma, mode)
