"""When a head flags a text: the rule the server and the LLM Guard scanners share (no FastAPI).

- **Benign labels** never flag. They are explicit where someone said so, else guessed from the
  label names (:func:`guardmerge.models.benign.resolve_benign`, head knowledge shared with the
  merge, which warns about them early).
- **Label rule** (``flags: labels`` in the head-kind table: single- and multi-label heads): a
  text is flagged when any non-benign label has a probability (softmax; a sigmoid per label for
  a multi-label head) at or above its threshold (the label's own, else the head's); a threshold
  of ``None`` never flags. Without a benign-looking label every label of a multi-label head
  flags (each is a harm category, as in toxicity heads).
- **Entity rule** (``flags: entities``: token heads): the head flags a text that contains an
  entity of a flagged type (by default any entity); a threshold of ``None`` turns its flag off.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from guardmerge.errors import GuardmergeError, InvalidTextError

__all__ = [
    "entity_flag",
    "flag_score",
    "is_flagged",
    "label_flag",
    "normalise_texts",
    "parse_label_lists",
    "parse_thresholds",
    "predict_thresholds",
]


def flag_score(probs: np.ndarray, benign: Collection[int]) -> float | None:
    """The highest probability among a head's non-benign labels (indices not in ``benign``) for
    one text's probabilities ``[C]``; None when every label is benign (the head never flags)."""
    flagging = [i for i in range(len(probs)) if i not in benign]
    if not flagging:
        return None
    return float(probs[flagging].max())


def is_flagged(score: float | None, threshold: float | None) -> bool:
    """The flag of a :func:`flag_score`: at or above ``threshold`` (None: never)."""
    return score is not None and threshold is not None and score >= threshold


def label_flag(probs: np.ndarray, thresholds: Sequence[float | None], benign: Collection[int]) -> bool:
    """Whether any label outside ``benign`` (indices) has a probability at or above its own
    threshold (None: that label never flags); ``probs`` and ``thresholds`` are ``[C]``."""
    return any(
        i not in benign and th is not None and float(p) >= th for i, (p, th) in enumerate(zip(probs, thresholds))
    )


def entity_flag(
    spans: Sequence[Mapping[str, Any]], types: Collection[str] | None, threshold: float | None = 0.5
) -> bool:
    """The flag of a token head on one text's entity spans: an entity of a type in ``types``
    (None: any type); a ``threshold`` of None never flags (numbers do not filter entities)."""
    if threshold is None:
        return False
    return any(types is None or s["label"] in types for s in spans)


def normalise_texts(texts: Sequence[str]) -> tuple[list[str], list[InvalidTextError]]:
    """Texts in Unicode NFC, and an error for each text that cannot be encoded as UTF-8."""
    out: list[str] = []
    bad: list[InvalidTextError] = []
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad.append(InvalidTextError(i, exc.start, text[exc.start]))
            continue
        out.append(unicodedata.normalize("NFC", text))
    return out, bad


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


def predict_thresholds(items: list[str] | None) -> dict[str, float | dict[str, float]]:
    """``--threshold`` of ``predict``: ``task=0.7`` or ``task.label=0.7`` (no ``off``)."""
    out: dict[str, float | dict[str, float]] = {}
    for key, value in parse_thresholds(items or []).items():
        if value is None:
            raise GuardmergeError(f"--threshold {key}=off: predict has no flags to turn off; give a number")
        task, _, label = key.partition(".")
        if label:
            per = out.setdefault(task, {})
            if not isinstance(per, dict):
                raise GuardmergeError(f"--threshold: task '{task}' has both one threshold and per-label ones")
            per[label] = value
        else:
            out[task] = value
    return out
