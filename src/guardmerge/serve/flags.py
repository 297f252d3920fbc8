"""When a head flags a text: the rule the server and the LLM Guard scanners share (no FastAPI).

A head's first label (index 0: ``benign``, ``not-hate``...) is its benign one. The head *flags* a
text when any other label has a probability at or above the head's threshold; a threshold of
``None`` never flags, and neither does a head with a single label.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def flag_score(probs: np.ndarray) -> float | None:
    """The highest probability among a head's non-benign labels (every label but the first) for
    one text's probabilities ``[C]``; None for a one-label head, which never flags."""
    if len(probs) < 2:
        return None
    return float(probs[1:].max())


def is_flagged(score: float | None, threshold: float | None) -> bool:
    """The flag of a :func:`flag_score`: at or above ``threshold`` (None: never)."""
    return score is not None and threshold is not None and score >= threshold
