"""The one NaN/Inf check: every tensor read from a checkpoint or statistics file, every merged
tensor written, and every loaded model's weights go through :func:`all_finite`.

``torch.aminmax`` makes it one reduction over memory with no temporary: a NaN propagates to both
results and an infinity is the minimum or the maximum, so the check is exactly as strict as
``torch.isfinite(t).all()``, which first writes a boolean tensor of the input's size and is
about 25x slower on CPU (benchmarks/merge_speed.py measures what the checks cost a merge).
"""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` (any shape) holds no NaN or infinity; non-float and empty: True."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
