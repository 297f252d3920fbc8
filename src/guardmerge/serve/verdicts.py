"""Each head's verdict on each text, from the batcher's outputs and the heads' rules (:mod:`guardmerge.serve.rules`).

A guard fails closed. A head whose scores for a text are NaN or infinite, or that raised, gives that
text ``{"error": {"code", "message"}, "flagged": true}`` (``non_finite_output`` or
``inference_failed``), and the text is flagged; the other heads still answer. No failure ever gives
a benign verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guardmerge.serve.flags import entity_flag, label_flag
from guardmerge.serve.rules import HeadRule
from guardmerge.serve.schemas import VERDICTS, HeadErrorBody, HeadErrorVerdict, TextVerdict

log = logging.getLogger(__name__)

__all__ = ["HeadFailure", "failed_rows", "has_head_failure", "verdicts"]


@dataclass(frozen=True)
class HeadFailure:
    """A head that gave no output for a text: the row of an object array in the batcher's output."""

    code: str
    message: str


def failed_rows(n: int, code: str, message: str) -> np.ndarray:
    """``n`` rows of one :class:`HeadFailure` (an object array, routed like a head's logits)."""
    rows = np.empty(n, dtype=object)
    rows.fill(HeadFailure(code, message))
    return rows


def has_head_failure(outputs: Mapping[str, np.ndarray]) -> bool:
    """True when some head failed on some text of a batch (its rows are :class:`HeadFailure`)."""
    return any(
        v.dtype == object and any(isinstance(x, HeadFailure) for x in v)
        for v in outputs.values()
        if isinstance(v, np.ndarray)
    )


def _non_finite(task: str) -> HeadErrorVerdict:
    return HeadErrorVerdict(
        error=HeadErrorBody(
            code="non_finite_output",
            message=f"head '{task}' produced non-finite scores (NaN or infinity) for this text: no verdict",
        )
    )


def _head_verdicts(task: str, values: np.ndarray, rule: HeadRule) -> list[Any]:
    """One head's verdict (or error verdict) for each text of ``values`` (its logits, or an object
    array of entity spans, :class:`HeadFailure` or None), by its kind's flag rule and answer."""
    kind = rule.kind
    if kind.flags == "entities":
        return [_entity_verdict(task, v, rule) for v in values]
    if values.dtype == object:
        return [HeadErrorVerdict(error=HeadErrorBody(code=v.code, message=v.message)) for v in values]
    n = len(values)
    finite = np.isfinite(values.reshape(n, -1)).all(axis=-1)
    with np.errstate(all="ignore"):
        probs = kind.activation(values)
    names = rule.labels
    benign = {k for k, name in enumerate(names) if name in rule.benign}
    schema = VERDICTS[kind.name]
    out: list[Any] = []
    for i in range(n):
        if not finite[i] or not np.isfinite(probs[i]).all():
            out.append(_non_finite(task))
            continue
        p = probs[i]
        flagged = label_flag(p, rule.label_thresholds, benign)
        out.append(schema(**kind.answer(p, names, rule.label_thresholds), flagged=flagged))
    return out


def _entity_verdict(task: str, value: Any, rule: HeadRule) -> Any:
    """A token head's verdict on one text from its entity spans (None: non-finite scores)."""
    if isinstance(value, HeadFailure):
        return HeadErrorVerdict(error=HeadErrorBody(code=value.code, message=value.message))
    if value is None:
        return _non_finite(task)
    spans = list(value)
    answer = rule.kind.answer(spans, rule.labels, rule.label_thresholds)
    return VERDICTS[rule.problem](**answer, flagged=entity_flag(spans, rule.entities, rule.threshold))


def verdicts(
    outputs: dict[str, np.ndarray], rules: dict[str, HeadRule], truncated: Sequence[bool] | np.ndarray | None = None
) -> list[TextVerdict]:
    """Per text, each head's verdict (the rule: :mod:`guardmerge.serve.rules`): ``outputs`` holds each sequence
    head's logits ``[n, C]`` and each token head's entity spans (an object array of lists); a head
    that failed on a text (non-finite scores, :class:`HeadFailure`, an error while making its
    verdict) gets an error verdict there, which flags the text."""
    tasks = list(outputs)
    n = len(next(iter(outputs.values()))) if outputs else 0
    per_head: dict[str, list[Any]] = {}
    for t in tasks:
        try:
            per_head[t] = _head_verdicts(t, outputs[t], rules[t])
            if len(per_head[t]) != n:
                raise ValueError(f"{len(per_head[t])} verdicts for {n} texts")
        except Exception as exc:
            log.error("head '%s': verdicts failed: %s: %s", t, type(exc).__name__, exc)
            message = f"head '{t}' failed: {type(exc).__name__}"
            per_head[t] = [HeadErrorVerdict(error=HeadErrorBody(code="inference_failed", message=message))] * n
    out = []
    for i in range(n):
        heads = {t: per_head[t][i] for t in tasks}
        out.append(
            TextVerdict(
                flagged=any(h.flagged for h in heads.values()),
                truncated=bool(truncated[i]) if truncated is not None else False,
                heads=heads,
            )
        )
    return out
