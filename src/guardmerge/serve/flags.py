"""When a head flags a text: the rule the server and the LLM Guard scanners share (no FastAPI).

- **Benign labels** never flag. They are explicit where someone said so: the expert's ``benign:``
  in the merge config (stored with the head), ``--benign task=LABEL,...`` for the server,
  ``benign=`` for the scanners. Otherwise they are guessed from the label names
  (:func:`guess_benign`), the guess is logged, and a guess never silences a label: a name that
  only *looks* like a negation (``not_safe_for_work``, ``non_violent_crimes``) is ambiguous, so it
  flags, with a warning. A single-label head whose benign label cannot be told from the names
  (``anger, joy, optimism, sadness``; ``LABEL_0, LABEL_1``) is refused until its benign labels
  are given (:func:`resolve_benign`), since flagging any label of it would be a guess.
- **Single-label heads** flag a text when any non-benign label has a probability at or above
  its threshold (the label's own, else the head's); a threshold of ``None`` never flags.
- **Multi-label heads:** a sigmoid per label; the same rule per label. Without a benign-looking
  label every label flags (each is a harm category, as in toxicity heads).
- **Token heads:** the head flags a text that contains an entity of a flagged type (by default
  any entity); a threshold of ``None`` turns its flag off.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from guardmerge.errors import GuardmergeError, InvalidTextError
from guardmerge.outputs import sigmoid, softmax

log = logging.getLogger(__name__)

__all__ = [
    "BENIGN_NAMES",
    "entity_flag",
    "flag_score",
    "guess_benign",
    "is_flagged",
    "label_flag",
    "normalise_texts",
    "parse_label_lists",
    "parse_thresholds",
    "resolve_benign",
    "sigmoid",
    "softmax",
]

BENIGN_NAMES = frozenset({"neutral", "benign", "safe", "clean", "none", "normal", "harmless", "ok", "legitimate"})
"""Label names (case-insensitive; ``-``, ``_`` and spaces alike) taken as benign when guessing."""

NEGATIONS = ("not", "non", "no")
"""Prefixes that make a label the negation of another (``not-hate`` of ``hate``)."""


def _words(label: str) -> list[str]:
    return [w for w in re.split(r"[\s_\-]+", label.strip().lower()) if w]


def guess_benign(labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(benign, ambiguous)`` labels of a head, guessed from the names alone.

    A label is benign when its name is one of :data:`BENIGN_NAMES`, or when it negates another
    label of the head whose name has no benign word (``not-hate`` beside ``hate``, ``non_irony``
    beside ``irony``). A name that starts with a negation but negates no such label
    (``not_safe_for_work``, ``non_violent_crimes``; ``not_safe`` beside ``safe``) is ambiguous:
    it is never taken as benign.
    """
    others = {" ".join(_words(n)): n for n in labels}
    benign, ambiguous = [], []
    for label in labels:
        words = _words(label)
        name = " ".join(words)
        if name in BENIGN_NAMES:
            benign.append(label)
            continue
        if len(words) > 1 and words[0] in NEGATIONS:
            negated = " ".join(words[1:])
            if negated in others and not set(_words(negated)) & BENIGN_NAMES:
                benign.append(label)
            else:
                ambiguous.append(label)
    return benign, ambiguous


def resolve_benign(
    task: str, labels: Sequence[str], problem: str, given: Collection[str] | None, how: str
) -> frozenset[str]:
    """The benign labels of head ``task``: ``given`` when someone said so (checked against the
    labels), else :func:`guess_benign`'s, logged.

    Args:
        problem: the head kind (``single_label`` or ``multi_label``).
        how: how the user states them, for messages (``--benign task=LABEL,...``).

    Raises:
        GuardmergeError: a given label the head lacks, or a single-label head whose benign labels
            cannot be guessed.
    """
    if given is not None:
        unknown = sorted(set(given) - set(labels))
        if unknown:
            raise GuardmergeError(
                f"benign labels of head '{task}': unknown label(s) {', '.join(unknown)}; its labels are "
                f"{', '.join(labels)}"
            )
        return frozenset(given)
    benign, ambiguous = guess_benign(labels)
    if ambiguous:
        log.warning(
            "head '%s': label(s) %s look like negations but negate no label of the head: taken as harmful "
            "(they flag); if they are benign, say so with %s",
            task,
            ", ".join(ambiguous),
            how,
        )
    if problem == "single_label" and len(labels) > 1 and not benign:
        raise GuardmergeError(
            f"head '{task}': none of its labels ({', '.join(labels)}) looks benign, and guardmerge does not guess "
            f"which labels never flag: name them with {how}"
        )
    if benign:
        log.info("head '%s': labels taken as benign (guessed from their names): %s", task, ", ".join(benign))
    elif problem == "multi_label":
        log.info("head '%s': no label looks benign: every label flags", task)
    return frozenset(benign)


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
