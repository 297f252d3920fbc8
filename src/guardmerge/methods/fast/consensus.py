"""TIES sign election and disjoint aggregation over column chunks (Yadav et al. 2023, steps 2-3).

The readable whole-tensor version is :func:`~guardmerge.methods.reference.ties_consensus`
(:func:`~guardmerge.methods.reference.elect_sign`, then
:func:`~guardmerge.methods.reference.disjoint_merge`); :class:`ChunkConsensus` computes the same
on one tensor's column chunks, with the same float operations in fewer passes.

Inputs are the sparsified task vectors ``t_i``; per-expert weights multiply them before the
election, as in mergekit.

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

import torch

from guardmerge.methods.fast.kernels import ConsensusSpec
from guardmerge.methods.params import Consensus


def _weighted(sparse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``w_i * t_i``: ``[N, w]`` x ``[N]`` -> ``[N, w]`` (a new tensor)."""
    return sparse * weights.to(sparse.dtype).unsqueeze(1)


def _sign_of_sum(total: torch.Tensor, fallback: float) -> torch.Tensor:
    """``gamma`` in {-1, +1}: the sign of the column sums ``total``, ``fallback`` where exactly 0."""
    return torch.copysign(torch.ones_like(total), total).masked_fill_(total == 0, fallback)


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
        wd = _weighted(sparse, self.weights)
        total = wd.sum(0)
        if self.own_mass:  # (own mass: the fallback is +1 until finish() knows the mass's sign)
            self._keep_alternatives(start, wd, total)
        return self._merge(wd, _sign_of_sum(total, self.fallback))

    def _keep_alternatives(self, start: int, wd: torch.Tensor, total: torch.Tensor) -> None:
        """Add the chunk's column sums to the mass (float64), and merge its zero-sum columns
        that hold an entry agreeing with +1 (so one with -1 too) once more, with -1."""
        self.mass += float(total.sum(dtype=torch.float64))
        cols = torch.nonzero((total == 0) & (wd > 0).any(0)).squeeze(1)
        if cols.numel():
            minus = -torch.ones(cols.numel(), dtype=wd.dtype)
            self._alternatives.append((cols + start, self._merge(wd[:, cols], minus)))

    def _merge(self, wd: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """The disjoint merge of ``wd`` ``[N, w]`` (overwritten) for the signs ``gamma`` ``[w]``.

        The arithmetic of the reference's election and disjoint merge in fewer passes: with
        gamma in {-1, +1}, ``sign(wd_i) == gamma  <=>  wd_i * gamma > 0``, and the agreeing sum
        is ``gamma * sum_i max(wd_i * gamma, 0)`` (multiplying by +-1 is exact).
        """
        signed = wd.mul_(gamma)
        agree = signed > 0
        merged = signed.clamp_min_(0).sum(0).mul_(gamma)  # sum_i |wd_i| over the agreeing entries, signed
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
