"""What a tensor is (:class:`Role`), as the architecture adapter tells the merge methods.

It lives with the adapters, not in :mod:`guardmerge.methods` (which re-exports it), so loading a
model never imports the method registry."""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    """What a tensor is, as told by the architecture adapter."""

    LINEAR_WEIGHT = "linear_weight"  # [out, in] weight of an nn.Linear
    BIAS = "bias"
    NORM = "norm"  # LayerNorm weight or bias
    EMBEDDING = "embedding"
    HEAD = "head"  # a task head tensor (merged only in hm3 head mode)
    OTHER = "other"
