"""The head kinds: one table entry per kind of classification head, holding everything that
differs between kinds, so that code elsewhere asks the table rather than compares kind names.
Adding a kind is one entry in :data:`HEAD_KINDS` (and its name in :data:`KindName`).

- ``single_label``: a softmax over the labels; the answer is the most probable label.
- ``multi_label``: a sigmoid per label; the answer is every label's probability and the labels
  at or above their thresholds.
- ``token``: a softmax per token (logits ``[B, T, C]`` read from every token); the answer is the
  text's entity spans.

Only numpy is imported here: an ONNX runtime process (``serve --backend onnx``, the LLM Guard
scanners) reads the table without torch; hooks that take torch tensors use their methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from guardmerge.errors import GuardmergeError
from guardmerge.models.outputs import (
    Answering,
    entity_answer,
    label_answer,
    label_set_answer,
    multi_label_answers,
    sigmoid,
    single_label_answers,
    softmax,
    token_answers,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_KIND",
    "HEAD_KINDS",
    "KIND_NAMES",
    "MULTI_LABEL_PROBLEM_TYPE",
    "HeadKind",
    "KindName",
    "head_kind",
    "kinds_where",
    "stock_kind",
]

KindName = Literal["single_label", "multi_label", "token"]
"""The kind names (``HeadSpec.problem``, ``guardmerge_onnx.json``'s ``problem``, a task folder's ``type``)."""

MULTI_LABEL_PROBLEM_TYPE = "multi_label_classification"
"""transformers' ``problem_type`` of a multi-label sequence classifier."""


@dataclass(frozen=True)
class HeadKind:
    """What one kind of head does differently from the others.

    Attributes:
        name: the kind's name (:data:`KindName`).
        activation: logits ``[..., C]`` -> probabilities (numpy, float64): softmax, a sigmoid per
            label, a softmax per token.
        onnx_activation: the activation's name in ``guardmerge_onnx.json`` (raw logits are exported).
        per_token: the head reads every token (``[B, T, d] -> [B, T, C]``, head input ``tokens``),
            exports to the family's ``*ForTokenClassification`` and answers with entity spans.
        exclusive: one label per text (the argmax): a head whose benign labels cannot be guessed
            from the names is refused until they are given, and the search scores its argmax.
        thresholded: the answer holds the labels at or above per-label thresholds (``predict``'s
            ``thresholds=`` and evaluation read them).
        flags: the serving flag rule: ``labels`` (a non-benign label at or above its threshold;
            benign labels and per-label thresholds apply) or ``entities`` (an entity of a flagged
            type; ``--flag-entities`` applies).
        stock_problem_type: the stock config's ``problem_type`` (None: not written).
        gold: the :class:`~guardmerge.data.Examples` field holding this kind's labels.
        metric: the scorer in :mod:`guardmerge.evaluate` (``evaluate.SCORERS``) for this kind.
        fidelity: the comparison of a merged head with its expert in :mod:`guardmerge.evaluate.fidelity`
            (``fidelity.COMPARISONS``): argmax agreement, label-set agreement at thresholds (and per
            label), or entity-span F1 (and per-token tag agreement).
        card_note: what the model card adds after the head's labels.
        agreement: the alignment target: ``(logits, expert_logits) -> bool tensor`` of where a
            refitted head's decisions agree with its expert's (the argmax; each label at 0.5).
        predict: ``(logits, Answering) -> answers``, one per text (:meth:`MultiHeadModel.predict`).
        answer: ``(probabilities [C] or entity spans, labels, thresholds) -> dict``: the server's
            answer on one text (its verdict without ``flagged``).
        distill_loss: ``(student_logits, teacher_logits, attention_mask [B, T], temperature) ->
            scalar``: heal's loss of a head against its expert (docs/algorithms.md 3c): KL at
            temperature T times T^2 (single-label), BCE on the expert's sigmoid probabilities
            (multi-label), per-token KL over the non-padding tokens (token).
    """

    name: KindName
    activation: Callable[[np.ndarray], np.ndarray]
    onnx_activation: str
    per_token: bool
    exclusive: bool
    thresholded: bool
    flags: Literal["labels", "entities"]
    stock_problem_type: str | None
    gold: str
    metric: str
    fidelity: str
    card_note: str
    agreement: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    predict: Callable[[torch.Tensor, Answering], list[Any]]
    answer: Callable[[Any, Sequence[str], Sequence[float | None]], dict[str, Any]]
    distill_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

    @property
    def title(self) -> str:
        """The name as messages write it (``single-label``)."""
        return self.name.replace("_", "-")


def _argmax_agreement(logits: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1) == expert.argmax(-1)


def _decision_agreement(logits: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    return (logits >= 0) == (expert >= 0)


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T)) * T^2`` per row (last axis summed)."""
    t, s = (teacher / temperature).log_softmax(-1), (student / temperature).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1) * temperature**2


def _softmax_distill(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    return _kl(student, teacher, temperature).mean()


def _sigmoid_distill(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    p = teacher.sigmoid()  # BCE with logits, written with tensor methods (stable for large |x|)
    return (student.clamp(min=0) - student * p + (-student.abs()).exp().log1p()).mean()


def _token_distill(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    keep = mask.bool()
    return _kl(student[keep], teacher[keep], temperature).mean()


HEAD_KINDS: dict[str, HeadKind] = {
    kind.name: kind
    for kind in (
        HeadKind(
            name="single_label",
            activation=softmax,
            onnx_activation="softmax",
            per_token=False,
            exclusive=True,
            thresholded=False,
            flags="labels",
            stock_problem_type=None,
            gold="labels",
            metric="classification_metrics",
            fidelity="argmax_agreement",
            card_note="",
            agreement=_argmax_agreement,
            predict=single_label_answers,
            answer=label_answer,
            distill_loss=_softmax_distill,
        ),
        HeadKind(
            name="multi_label",
            activation=sigmoid,
            onnx_activation="sigmoid",
            per_token=False,
            exclusive=False,
            thresholded=True,
            flags="labels",
            stock_problem_type=MULTI_LABEL_PROBLEM_TYPE,
            gold="label_sets",
            metric="multi_label_metrics",
            fidelity="label_set_agreement",
            card_note=" (multi-label)",
            agreement=_decision_agreement,
            predict=multi_label_answers,
            answer=label_set_answer,
            distill_loss=_sigmoid_distill,
        ),
        HeadKind(
            name="token",
            activation=softmax,  # over the last axis: per token
            onnx_activation="token_softmax",
            per_token=True,
            exclusive=False,
            thresholded=False,
            flags="entities",
            stock_problem_type=None,
            gold="tags",
            metric="token_metrics",
            fidelity="span_agreement",
            card_note=" (token classification)",
            agreement=_argmax_agreement,
            predict=token_answers,
            answer=entity_answer,
            distill_loss=_token_distill,
        ),
    )
}
"""Every head kind by name; the first is the default (a head whose config names none)."""

KIND_NAMES: tuple[KindName, ...] = get_args(KindName)
DEFAULT_KIND: KindName = "single_label"


def head_kind(name: str) -> HeadKind:
    """The table entry of kind ``name``.

    Raises:
        GuardmergeError: an unknown kind (naming the known ones).
    """
    kind = HEAD_KINDS.get(name)
    if kind is None:
        raise GuardmergeError(f"unknown head kind '{name}'; expected one of {', '.join(HEAD_KINDS)}")
    return kind


def kinds_where(**fields: Any) -> list[HeadKind]:
    """The kinds whose attributes equal ``fields`` (``kinds_where(flags="labels")``), in table order."""
    return [k for k in HEAD_KINDS.values() if all(getattr(k, f) == v for f, v in fields.items())]


def stock_kind(token_classifier: bool, problem_type: Any) -> HeadKind:
    """The kind of a stock classifier: a token classifier's (``token_classifier``, by its
    ``architectures``), else the sequence kind whose ``stock_problem_type`` is ``problem_type``,
    else the sequence kind that writes none."""
    fits = kinds_where(per_token=token_classifier)
    named = [k for k in fits if k.stock_problem_type is not None and k.stock_problem_type == problem_type]
    return named[0] if named else next(k for k in fits if k.stock_problem_type is None)
