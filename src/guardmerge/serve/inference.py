"""What runs on the batcher's worker thread: every requested head's logits, token heads' entity spans,
each text's truncation flag (:class:`HeadRunner`), and the server's health (:class:`HealthState`).

When the heads' shared pass raises, each head runs alone, so that a failing head gets
:class:`~guardmerge.serve.verdicts.HeadFailure` rows and the others still answer; only when every
head fails does the batch fail. A model whose weights hold NaN or infinity never answers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from guardmerge.errors import NonFiniteWeightsError
from guardmerge.models.outputs import entity_spans, token_rows
from guardmerge.serve.backends import Backend
from guardmerge.serve.memory import release_free_memory
from guardmerge.serve.rules import HeadRule
from guardmerge.serve.verdicts import failed_rows

log = logging.getLogger(__name__)

__all__ = ["TRUNCATED", "HeadRunner", "HealthState", "bad_weights", "entity_outputs"]

TRUNCATED = "\x00truncated"
"""The batcher output carrying each text's truncation flag (not a head: no task name holds NUL)."""


@dataclass
class HealthState:
    """What /healthz reports beyond the batcher: the start-up weight check and the last inference."""

    bad_weights: list[str] = field(default_factory=list)
    last_output_finite: bool = True


def bad_weights(backend: Backend) -> list[str]:
    """The backend's weights holding NaN or infinity (found when it was built)."""
    found = getattr(backend, "bad_weights", None)
    if found is None:  # a backend of an older interface
        check = getattr(backend, "non_finite_weights", None)
        found = check() if callable(check) else []
    return list(found)


def entity_outputs(
    backend: Backend,
    texts: Sequence[str],
    logits: Mapping[str, np.ndarray],
    rules: Mapping[str, HeadRule],
    aggregation: str,
) -> dict[str, np.ndarray]:
    """Each token head's entity spans per text (an object array of lists; None for a text whose
    scores are not finite; a :class:`HeadFailure` for every text when making the spans raised)
    from its padded per-token logits ``[n, T, C]``."""
    try:
        tokens = backend.text_tokens(texts)  # type: ignore[attr-defined]
    except Exception as exc:
        log.error("token heads %s: tokens for entity spans failed: %s: %s", ", ".join(logits), type(exc).__name__, exc)
        return {
            t: failed_rows(len(texts), "inference_failed", f"head '{t}' failed: {type(exc).__name__}") for t in logits
        }
    side = str(getattr(backend, "padding_side", "right"))
    out = {}
    for task, values in logits.items():
        if values.dtype == object:  # the head already failed
            out[task] = values
            continue
        spans = np.empty(len(texts), dtype=object)
        try:
            for i, (text, tok) in enumerate(zip(texts, tokens)):
                rows = token_rows(values[i], len(tok), side)
                spans[i] = (
                    entity_spans(text, tok, rules[task].kind.activation(rows), rules[task].labels, aggregation)
                    if np.isfinite(rows).all()
                    else None
                )
        except Exception as exc:
            log.error("token head '%s': entity spans failed: %s: %s", task, type(exc).__name__, exc)
            spans = failed_rows(len(texts), "inference_failed", f"head '{task}' failed: {type(exc).__name__}")
        out[task] = spans
    return out


class HeadRunner:
    """The batcher's inference function: ``(texts, tasks or None) -> outputs`` (see the module docstring).

    Args:
        backend: the model.
        rules: every head's rule, in model order.
        aggregation: how token heads group word pieces into entities.
        health: updated with whether the last inference's scores were finite.
    """

    def __init__(self, backend: Backend, rules: Mapping[str, HeadRule], aggregation: str, health: HealthState) -> None:
        self.backend = backend
        self.rules = rules
        self.aggregation = aggregation
        self.health = health
        self.token_tasks = {t for t, r in rules.items() if r.kind.per_token}

    def __call__(self, texts: Sequence[str], chosen: Sequence[str] | None) -> dict[str, np.ndarray]:
        """Logits of the sequence heads, entity spans (an object array) of the token heads, and each
        text's truncation flag: made here, on the worker thread, which alone uses the tokenizer."""
        truncated_of = getattr(self.backend, "truncated", None)
        flags = np.asarray(truncated_of(texts) if callable(truncated_of) else [False] * len(texts), dtype=bool)
        out = self.run_heads(texts, chosen)
        self.health.last_output_finite = all(bool(np.isfinite(v).all()) for v in out.values() if v.dtype != object)
        wanted = [t for t in out if t in self.token_tasks]
        if wanted:
            out.update(entity_outputs(self.backend, texts, {t: out[t] for t in wanted}, self.rules, self.aggregation))
        out[TRUNCATED] = flags
        release_free_memory()  # varying batch shapes fragment the heap: without it, RSS grows
        return out

    def run_heads(self, texts: Sequence[str], chosen: Sequence[str] | None) -> dict[str, np.ndarray]:
        """Every head's logits in one pass; when that raises, each head alone, so that a failing head
        gets :class:`HeadFailure` rows and the others still answer (all failing: the error is raised)."""
        try:
            return dict(self.backend.logits(texts, chosen))
        except NonFiniteWeightsError:
            raise
        except Exception as exc:
            names = list(chosen) if chosen is not None else list(self.rules)
            if len(names) < 2:
                raise
            log.warning(
                "inference of %d heads failed (%s: %s); running each head alone", len(names), type(exc).__name__, exc
            )
            out = {t: self._one_head(texts, t) for t in names}
            if all(v.dtype == object for v in out.values()):
                raise exc from None
            return out

    def _one_head(self, texts: Sequence[str], task: str) -> np.ndarray:
        """``task``'s logits alone, or :class:`HeadFailure` rows when it raises."""
        try:
            return self.backend.logits(texts, [task])[task]
        except NonFiniteWeightsError:
            raise
        except Exception as exc:
            log.error("head '%s' failed on %d texts: %s: %s", task, len(texts), type(exc).__name__, exc)
            return failed_rows(len(texts), "inference_failed", f"head '{task}' failed: {type(exc).__name__}")
