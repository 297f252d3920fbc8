"""What guardmerge stores inside a stock expert folder, beside transformers' own config keys.

``guardmerge finetune`` writes a ``guardmerge_expert`` object into the expert's ``config.json``
(transformers keeps unknown keys, so the folder stays a stock classifier that
``AutoModelForSequenceClassification`` loads, and a ``save_pretrained`` keeps the key)::

    "guardmerge_expert": {"thresholds": {"admiration": 0.41, "amusement": 0.37, ...}}

``thresholds``: each label's flag threshold of a thresholded (multi-label) head, tuned on the
validation split. It is not named ``guardmerge``: that key marks a merged multi-head folder.

:func:`load_model` is :func:`~guardmerge.models.multihead.load_any` plus these stored values: what
``predict`` and ``eval`` load, so an expert is used at its tuned thresholds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardmerge.errors import CheckpointError

if TYPE_CHECKING:
    from guardmerge.models.multihead import MultiHeadModel

__all__ = ["EXPERT_KEY", "expert_section", "load_model", "stored_thresholds"]

EXPERT_KEY = "guardmerge_expert"
"""The ``config.json`` key of a stock expert's guardmerge settings."""


def expert_section(thresholds: Mapping[str, float]) -> dict[str, Any]:
    """The ``guardmerge_expert`` object to store (label -> threshold, rounded to 4 places)."""
    return {"thresholds": {str(k): round(float(v), 4) for k, v in thresholds.items()}}


def stored_thresholds(config: Mapping[str, Any], where: str = "config.json") -> dict[str, float]:
    """The per-label thresholds stored in an expert's ``config`` (empty when none).

    Raises:
        CheckpointError: a malformed section (not an object, or a value outside [0, 1]).
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
    return out


def load_model(path: str | Path, task: str | None = None) -> MultiHeadModel:
    """A merged folder as is, or a stock classifier folder as a one-head model at the thresholds
    stored in its ``config.json`` (:data:`EXPERT_KEY`; thresholded heads only)."""
    from guardmerge.io.checkpoint import resolve
    from guardmerge.io.formats import read_config
    from guardmerge.models.multihead import load_any

    model = load_any(path, task)
    folder = resolve(path)
    config = read_config(folder)
    if "guardmerge" in config:  # a merged folder: its heads carry their own thresholds
        return model
    thresholds = stored_thresholds(config, str(Path(folder) / "config.json"))
    for name in model.tasks:
        spec = model.spec(name)
        if not thresholds or not spec.kind.thresholded or spec.thresholds:
            continue
        unknown = sorted(set(thresholds) - set(spec.labels))
        if unknown:
            raise CheckpointError(
                f"{folder}: '{EXPERT_KEY}.thresholds' names unknown label(s) {', '.join(unknown)}; "
                f"the labels are {', '.join(spec.labels)}"
            )
        model.head(name).spec = dataclasses.replace(spec, thresholds=dict(thresholds))
    return model
