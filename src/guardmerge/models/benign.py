"""Benign labels: which labels of a head never flag a text (head knowledge, read by the merge,
the server and the LLM Guard scanners).

They are explicit where someone said so: the expert's ``benign:`` in the merge config (stored
with the head), ``--benign task=LABEL,...`` for the server, ``benign=`` for the scanners.
Otherwise they are guessed from the label names (:func:`guess_benign`), the guess is logged, and
a guess never silences a label: a name that only *looks* like a negation
(``not_safe_for_work``, ``non_violent_crimes``) is ambiguous, so it flags, with a warning. A head
of an exclusive kind (single-label) whose benign label cannot be told from the names (``anger,
joy, optimism, sadness``; ``LABEL_0, LABEL_1``) is refused until its benign labels are given
(:func:`resolve_benign`), since flagging any label of it would be a guess.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Sequence

from guardmerge.errors import GuardmergeError
from guardmerge.models.head_kinds import head_kind

log = logging.getLogger(__name__)

__all__ = ["BENIGN_NAMES", "NEGATIONS", "guess_benign", "resolve_benign"]

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
        problem: the head kind (a kind that flags by labels: ``single_label`` or ``multi_label``).
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
    kind = head_kind(problem)
    if kind.exclusive and len(labels) > 1 and not benign:
        raise GuardmergeError(
            f"head '{task}': none of its labels ({', '.join(labels)}) looks benign, and guardmerge does not guess "
            f"which labels never flag: name them with {how}"
        )
    if benign:
        log.info("head '%s': labels taken as benign (guessed from their names): %s", task, ", ".join(benign))
    elif not kind.exclusive:
        log.info("head '%s': no label looks benign: every label flags", task)
    return frozenset(benign)
