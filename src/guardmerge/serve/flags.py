"""When a head flags a text: the rule the server and the LLM Guard scanners share (no FastAPI).

- **Single-label heads:** the first label (index 0: ``benign``, ``not-hate``...) is the benign one.
  The head *flags* a text when any other label has a probability at or above its threshold (the
  label's own, else the head's); a threshold of ``None`` never flags, and neither does a head
  with a single label.
- **Multi-label heads:** a sigmoid per label; the head flags a text when any non-benign label
  has a probability at or above its threshold. A head's benign labels are configurable; by
  default they are the labels named (case-insensitive) ``neutral``, ``benign``, ``safe``,
  ``clean``, ``none`` or ``normal``, or starting with ``non`` or ``not`` (``non-toxic``,
  ``not_hate``): see :func:`default_benign`.
- **Token heads:** the head flags a text that contains an entity of a flagged type (by default
  any entity); a threshold of ``None`` turns its flag off.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from guardmerge.errors import GuardmergeError
from guardmerge.outputs import sigmoid, softmax

__all__ = [
    "BENIGN_NAMES",
    "default_benign",
    "entity_flag",
    "flag_score",
    "is_flagged",
    "label_flag",
    "multi_label_flag",
    "parse_label_lists",
    "parse_thresholds",
    "sigmoid",
    "softmax",
]

BENIGN_NAMES = frozenset({"neutral", "benign", "safe", "clean", "none", "normal"})
"""Label names (lower case) a multi-label head treats as benign by default."""


def flag_score(probs: np.ndarray) -> float | None:
    """The highest probability among a head's non-benign labels (every label but the first) for
    one text's probabilities ``[C]``; None for a one-label head, which never flags."""
    if len(probs) < 2:
        return None
    return float(probs[1:].max())


def is_flagged(score: float | None, threshold: float | None) -> bool:
    """The flag of a :func:`flag_score`: at or above ``threshold`` (None: never)."""
    return score is not None and threshold is not None and score >= threshold


def default_benign(labels: Sequence[str]) -> list[str]:
    """A multi-label head's benign labels by default: those named (case-insensitive) ``neutral``,
    ``benign``, ``safe``, ``clean``, ``none`` or ``normal``, or starting with ``non`` or ``not``."""
    return [n for n in labels if n.strip().lower() in BENIGN_NAMES or n.strip().lower().startswith(("non", "not"))]


def label_flag(probs: np.ndarray, thresholds: Sequence[float | None], benign: Collection[int]) -> bool:
    """Whether any label outside ``benign`` (indices) has a probability at or above its own
    threshold (None: that label never flags); ``probs`` and ``thresholds`` are ``[C]``."""
    return any(
        i not in benign and th is not None and float(p) >= th for i, (p, th) in enumerate(zip(probs, thresholds))
    )


def multi_label_flag(
    probs: np.ndarray, labels: Sequence[str], thresholds: Sequence[float | None], benign: Collection[str]
) -> bool:
    """The flag of a multi-label head on one text's sigmoid probabilities ``[C]``."""
    return label_flag(probs, thresholds, {i for i, n in enumerate(labels) if n in benign})


def entity_flag(
    spans: Sequence[Mapping[str, Any]], types: Collection[str] | None, threshold: float | None = 0.5
) -> bool:
    """The flag of a token head on one text's entity spans: an entity of a type in ``types``
    (None: any type); a ``threshold`` of None never flags (numbers do not filter entities)."""
    if threshold is None:
        return False
    return any(types is None or s["label"] in types for s in spans)


def parse_thresholds(items: Sequence[str]) -> dict[str, float | None]:
    """``["injection=0.8", "emotion=off", "toxic.insult=0.7"]`` -> ``{"injection": 0.8,
    "emotion": None, "toxic.insult": 0.7}`` (``task.label``: one label's threshold)."""
    out: dict[str, float | None] = {}
    for item in items:
        task, sep, value = item.partition("=")
        task, value = task.strip(), value.strip()
        if "." in task:
            head, _, label = task.partition(".")
            task = f"{head.strip()}.{label.strip()}"
        if not sep or not task or not value or task.startswith(".") or task.endswith("."):
            raise GuardmergeError(f"threshold '{item}' must look like task=0.8, task.label=0.8 (or task=off)")
        if value.lower() in ("off", "none"):
            out[task] = None
            continue
        try:
            number = float(value)
        except ValueError:
            raise GuardmergeError(f"threshold '{item}': '{value}' is not a number in [0, 1] or 'off'") from None
        if not 0.0 <= number <= 1.0 or math.isnan(number):
            raise GuardmergeError(f"threshold '{item}': {number} is outside [0, 1]")
        out[task] = number
    return out


def parse_label_lists(items: Sequence[str], option: str = "--benign") -> dict[str, list[str]]:
    """``["toxic=neutral,clean"]`` -> ``{"toxic": ["neutral", "clean"]}`` (``option`` names the
    flag in errors)."""
    out: dict[str, list[str]] = {}
    for item in items:
        task, sep, value = item.partition("=")
        task = task.strip()
        names = [v.strip() for v in value.split(",") if v.strip()]
        if not sep or not task:
            raise GuardmergeError(f"{option} '{item}' must look like task=NAME1,NAME2")
        out.setdefault(task, []).extend(names)
    return out
