"""What guardmerge stores inside a stock expert folder, beside transformers' own config keys.

``guardmerge finetune`` writes a ``guardmerge_expert`` object into the expert's ``config.json``
(transformers keeps unknown keys, so the folder stays a stock classifier that
``AutoModelForSequenceClassification`` loads, and a ``save_pretrained`` keeps the key)::

    "guardmerge_expert": {"thresholds": {"admiration": 0.41, "amusement": 0.37, ...}}

``thresholds``: each label's flag threshold of a thresholded (multi-label) head, tuned on the
validation split. It is not named ``guardmerge``: that key marks a merged multi-head folder.

:func:`~guardmerge.models.folder.model_from_classifier` (so ``load_any``, ``predict`` and ``eval``)
and the merge engine read them, so an expert and its merged head are used at its tuned thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from guardmerge.errors import CheckpointError

__all__ = ["EXPERT_KEY", "expert_section", "stored_thresholds"]

EXPERT_KEY = "guardmerge_expert"
"""The ``config.json`` key of a stock expert's guardmerge settings."""


def expert_section(thresholds: Mapping[str, float]) -> dict[str, Any]:
    """The ``guardmerge_expert`` object to store (label -> threshold, rounded to 4 places)."""
    return {"thresholds": {str(k): round(float(v), 4) for k, v in thresholds.items()}}


def stored_thresholds(
    config: Mapping[str, Any], where: str = "config.json", labels: Sequence[str] | None = None
) -> dict[str, float]:
    """The per-label thresholds stored in an expert's ``config`` (empty when none).

    Raises:
        CheckpointError: a malformed section (not an object, a value outside [0, 1], or a label
            not among ``labels`` when they are given).
    """
    section = config.get(EXPERT_KEY)
    if section is None:
        return {}
    raw = section.get("thresholds") if isinstance(section, Mapping) else None
    if raw is None and isinstance(section, Mapping):
        return {}
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{where}: '{EXPERT_KEY}.thresholds' must be an object (label -> value in [0, 1])")
    out: dict[str, float] = {}
    for label, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise CheckpointError(f"{where}: '{EXPERT_KEY}.thresholds.{label}' must be a number, got {value!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise CheckpointError(f"{where}: '{EXPERT_KEY}.thresholds.{label}' must be in [0, 1], got {value}")
        out[str(label)] = float(value)
    unknown = sorted(set(out) - set(labels)) if labels is not None else []
    if unknown:
        raise CheckpointError(
            f"{where}: '{EXPERT_KEY}.thresholds' names unknown label(s) {', '.join(unknown)}; "
            f"the labels are {', '.join(labels or ())}"
        )
    return out
