"""The one NaN/Inf check: every tensor read from a checkpoint or statistics file, every merged
tensor written, and every loaded model's weights go through :func:`all_finite`.

``torch.aminmax`` makes it one reduction over memory with no temporary: a NaN propagates to both
results and an infinity is the minimum or the maximum, so the check is exactly as strict as
``torch.isfinite(t).all()``, which first writes a boolean tensor of the input's size and is
about 25x slower on CPU (benchmarks/merge_speed.py measures what the checks cost a merge).
"""

from __future__ import annotations

import math

import torch


def finite_abs_max(tensor: torch.Tensor) -> float | None:
    """The largest ``|value|`` of ``tensor`` (any shape), or None when it holds a NaN or an
    infinity; 0.0 for non-float and empty tensors. The same one reduction as :func:`all_finite`,
    so the range comes free with the check (the writer's output probe uses it)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(tensor.detach())
    low, high = float(lo), float(hi)
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return max(-low, high)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` (any shape) holds no NaN or infinity; non-float and empty: True."""
    return finite_abs_max(tensor) is not None
