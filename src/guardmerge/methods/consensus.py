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

from guardmerge.methods.kernels import ConsensusSpec
from guardmerge.methods.selection import column_chunks

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
    return _sign_of_sum(weighted_deltas.sum(0), -1.0 if float(mass) < 0 else 1.0)


def _sign_of_sum(total: torch.Tensor, fallback: float) -> torch.Tensor:
    """``gamma`` in {-1, +1}: the sign of the column sums ``total``, ``fallback`` where exactly 0."""
    return torch.copysign(torch.ones_like(total), total).masked_fill_(total == 0, fallback)


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


class ChunkConsensus:
    """TIES election + disjoint aggregation over one tensor's column chunks, in order.

    Each call takes ``(start, sparse chunk [N, w])`` and returns the merged chunk ``[w]``.
    With ``mass=None`` (per-tensor scope) the fallback for columns whose sum is exactly 0 is
    the sign of this tensor's own mass, known only after the last chunk: such columns are
    merged with +1 and their -1 alternative is kept aside; :meth:`finish` patches them.
    """

    def __init__(
        self,
        weights: torch.Tensor,
        mode: Consensus = "mean",
        mass: torch.Tensor | float | None = None,
    ) -> None:
        if mode not in ("mean", "sum"):
            raise ValueError(f"unknown consensus mode '{mode}'")
        self.weights, self.mode = weights, mode
        self.own_mass = mass is None
        self.fallback = 1.0 if mass is None or float(mass) >= 0 else -1.0
        self.mass = 0.0
        self._alternatives: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, start: int, sparse: torch.Tensor) -> torch.Tensor:
        # the same arithmetic as elect_sign + disjoint_merge, in fewer passes over [N, w]:
        # with gamma in {-1, +1}, sign(wd_i) == gamma  <=>  wd_i * gamma > 0, and the agreeing
        # sum is gamma * sum_i max(wd_i * gamma, 0) (multiplying by +-1 is exact)
        wd = weighted(sparse, self.weights)
        total = wd.sum(0)
        gamma = _sign_of_sum(total, self.fallback)
        signed = wd.mul_(gamma)
        agree = signed > 0
        agreeing = signed.clamp_min_(0).sum(0)  # sum_i |wd_i| over the agreeing entries
        if self.own_mass:  # (own mass: the fallback is +1 until finish() knows the mass's sign)
            self.mass += float(total.sum(dtype=torch.float64))  # the columns' sums, in float64
            # a zero sum with non-zero entries has a positive one, which agreed with the +1
            cols = torch.nonzero((total == 0) & (agreeing > 0)).squeeze(1)
            if cols.numel():
                alt = disjoint_merge(
                    weighted(sparse[:, cols], self.weights), self.weights, -torch.ones(cols.numel()), self.mode
                )
                self._alternatives.append((cols + start, alt))
        merged = agreeing.mul_(gamma)
        if self.mode == "sum":
            return merged
        divisor = torch.zeros_like(merged)  # sum_{i agreeing} w_i, in expert order
        for row, w in zip(agree, self.weights.to(signed.dtype).tolist()):
            divisor.add_(row, alpha=w)
        return merged.div_(divisor.masked_fill_(divisor == 0, 1.0))

    def fused_spec(self) -> ConsensusSpec:
        """This aggregation as the fused kernel takes it (see :mod:`.kernels`)."""
        return ConsensusSpec(self.weights, self.fallback, self.mode == "mean")

    def finish(self, merged: torch.Tensor) -> torch.Tensor:
        """Patch the zero-sum columns of the flat ``merged`` ``[d]`` if the mass is negative."""
        if self.own_mass and float(self.mass) < 0:
            for cols, alt in self._alternatives:
                merged[cols] = alt.to(merged.dtype)
        return merged


def ties_consensus(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    mode: Consensus = "mean",
    mass: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Steps 2-3 of TIES on sparsified task vectors ``[N, *shape]`` -> ``[*shape]``.

    ``mass`` is the election fallback's total mass over the scope; ``None`` uses this tensor's.
    """
    rows = deltas.reshape(deltas.shape[0], -1)
    agg = ChunkConsensus(weights, mode, mass)
    parts = [agg(start, chunk) for start, chunk in column_chunks(rows)]
    merged = torch.cat(parts) if parts else rows.new_zeros(0)
    return agg.finish(merged).view(deltas.shape[1:])
