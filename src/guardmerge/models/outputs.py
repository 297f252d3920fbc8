"""What each kind of head answers, from its logits (numpy only: shared by ``predict``, both
serving backends and evaluation). Which of these a head uses is its kind's entry in
:data:`guardmerge.models.head_kinds.HEAD_KINDS`.

- ``single_label``: a softmax over the labels; the most probable label.
- ``multi_label``: a sigmoid per label; every label's probability and the labels at or above
  their thresholds (0.5 unless set).
- ``token``: a softmax per token; the word pieces are aggregated into entity spans
  ``{label, start, end, text, score}`` (character offsets into the text) the way transformers'
  ``TokenClassificationPipeline`` does with ``aggregation_strategy`` ``simple`` (each piece its
  own argmax) or ``first`` (each word takes its first piece's label), then adjacent pieces or
  words of one entity type (``B-X`` starts a new one, ``I-X`` continues) become one span, scored
  by the mean of their probabilities; spans of label ``O`` are dropped. Offsets come from a fast
  tokenizer's offset mapping; a slow tokenizer is refused.

The answer hooks (:func:`single_label_answers`... for ``predict``, :func:`label_answer`... for
the server) take torch tensors only through their methods, so torch is never imported here.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from guardmerge.errors import GuardmergeError

if TYPE_CHECKING:
    import torch

AGGREGATIONS = ("first", "simple")
"""Entity aggregation strategies (transformers' ``TokenClassificationPipeline`` names)."""

DEFAULT_THRESHOLD = 0.5
"""The threshold of a multi-label head's labels that have none of their own."""

OUTSIDE = "O"
"""The tag of tokens outside any entity."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function, float64 (no overflow warnings for large logits)."""
    x = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def label_thresholds(
    labels: Sequence[str], stored: Mapping[str, float] | None = None, given: Mapping[str, float] | float | None = None
) -> list[float]:
    """Each label's threshold: ``given`` (one number for every label, or label -> number), else
    the head's ``stored`` ones, else :data:`DEFAULT_THRESHOLD`.

    Raises:
        GuardmergeError: a label in ``given`` that the head does not have.
    """
    if isinstance(given, (int, float)):
        return [float(given)] * len(labels)
    given = dict(given or {})
    unknown = sorted(set(given) - set(labels))
    if unknown:
        raise GuardmergeError(
            f"thresholds for unknown label(s) {', '.join(unknown)}; the labels are {', '.join(labels)}"
        )
    stored = dict(stored or {})
    return [float(given.get(n, stored.get(n, DEFAULT_THRESHOLD))) for n in labels]


def multi_label_result(probs: np.ndarray, labels: Sequence[str], thresholds: Sequence[float]) -> dict[str, Any]:
    """``{"labels": [names at or above their thresholds], "probabilities": {name: p}}`` for one
    text's sigmoid probabilities ``[C]``."""
    return {
        "labels": [n for n, p, t in zip(labels, probs, thresholds) if p >= t],
        "probabilities": {n: float(p) for n, p in zip(labels, probs)},
    }


# -- tokens and entity spans -------------------------------------------------------------------
@dataclass(frozen=True)
class TextTokens:
    """One text's tokens as the model reads them (no padding).

    Attributes:
        offsets: ``(start, end)`` character offsets of each token in the text (``(0, 0)`` for
            special tokens).
        special: whether each token is a special token (``[CLS]``, ``</s>``...).
        subword: whether each token continues the previous token's word (the pipeline's rule).
    """

    offsets: tuple[tuple[int, int], ...]
    special: tuple[bool, ...]
    subword: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.offsets)


def check_fast_tokenizer(tokenizer: Any, what: str = "token-classification heads") -> None:
    """Refuse a tokenizer without offset mappings (a slow, pure-Python one)."""
    if tokenizer is None:
        raise GuardmergeError(f"{what} need the model's tokenizer; load the model from a saved folder")
    if not getattr(tokenizer, "is_fast", False):
        raise GuardmergeError(
            f"{what} need a fast tokenizer (character offsets of each token), but this model's tokenizer is "
            f"{type(tokenizer).__name__}; save the model with a fast tokenizer (tokenizer.json)"
        )


def text_tokens(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[TextTokens]:
    """Tokenise ``texts`` as the model does (truncated at ``max_length``) with character offsets,
    special-token marks and the pipeline's sub-word flags.

    A tokenizer whose model marks continuing pieces (WordPiece's ``##``) tells sub-words by the
    piece being longer than its text; others (BPE, Unigram) by the character before the piece
    not being a space, as transformers' pipeline does; an unknown token never continues a word.
    """
    check_fast_tokenizer(tokenizer)
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    model = getattr(getattr(tokenizer, "_tokenizer", None), "model", None)
    word_aware = bool(getattr(model, "continuing_subword_prefix", None))
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for i, text in enumerate(texts):
        ids = list(enc["input_ids"][i])
        offsets = tuple((int(a), int(b)) for a, b in enc["offset_mapping"][i])
        special = tuple(bool(x) for x in enc["special_tokens_mask"][i])
        pieces = tokenizer.convert_ids_to_tokens(ids)
        subword = []
        for tid, piece, (start, end), sp in zip(ids, pieces, offsets, special):
            if sp or tid == unk:
                subword.append(False)
            elif word_aware:
                subword.append(len(piece) != len(text[start:end]))
            else:
                subword.append(start > 0 and " " not in text[start - 1 : start + 1])
        out.append(TextTokens(offsets, special, tuple(subword)))
    return out


def token_rows(logits: np.ndarray, count: int, padding_side: str = "right") -> np.ndarray:
    """A text's own rows ``[count, C]`` of its padded per-token logits ``[T, C]``."""
    if count > len(logits):
        raise GuardmergeError(f"the model returned {len(logits)} token rows for a text of {count} tokens")
    return logits[len(logits) - count :] if padding_side == "left" else logits[:count]


def _tag(label: str) -> tuple[str, str]:
    """``(B or I, entity type)`` of a tag, as the pipeline reads it (no prefix: a continuation)."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def entity_spans(
    text: str, tokens: TextTokens, probs: np.ndarray, labels: Sequence[str], aggregation: str = "first"
) -> list[dict[str, Any]]:
    """Entity spans of one text from its per-token probabilities ``[len(tokens), C]``.

    Returns:
        ``[{"label": type, "start": int, "end": int, "text": text[start:end], "score": float}]``
        in text order, where ``label`` is the tag without its ``B-``/``I-`` prefix.
    """
    if aggregation not in AGGREGATIONS:
        raise GuardmergeError(f"unknown aggregation '{aggregation}'; use one of {', '.join(AGGREGATIONS)}")
    if len(probs) != len(tokens):
        raise GuardmergeError(f"{len(probs)} rows of scores for {len(tokens)} tokens")
    pieces = [i for i in range(len(tokens)) if not tokens.special[i]]
    units: list[tuple[str, float, int, int]] = []  # (tag, score, start, end) per piece or word
    if aggregation == "simple":
        for i in pieces:
            k = int(probs[i].argmax())
            units.append((labels[k], float(probs[i][k]), *tokens.offsets[i]))
    else:
        words: list[list[int]] = []
        for i in pieces:
            if words and tokens.subword[i]:
                words[-1].append(i)
            else:
                words.append([i])
        for word in words:
            k = int(probs[word[0]].argmax())
            units.append((labels[k], float(probs[word[0]][k]), tokens.offsets[word[0]][0], tokens.offsets[word[-1]][1]))
    groups: list[list[tuple[str, float, int, int]]] = []
    for unit in units:
        bi, kind = _tag(unit[0])
        if groups and bi != "B" and kind == _tag(groups[-1][-1][0])[1]:
            groups[-1].append(unit)
        else:
            groups.append([unit])
    spans = []
    for group in groups:
        kind = group[0][0].split("-", 1)[-1]
        if kind == OUTSIDE:
            continue
        start, end = group[0][2], group[-1][3]
        score = float(np.mean([u[1] for u in group]))
        spans.append({"label": kind, "start": start, "end": end, "text": text[start:end], "score": score})
    return spans


def entity_types(labels: Sequence[str]) -> list[str]:
    """The entity types of a tag set (``B-PER``, ``I-PER``, ``O`` -> ``PER``), in tag order."""
    out: dict[str, None] = {}
    for label in labels:
        kind = label.split("-", 1)[-1]
        if kind != OUTSIDE:
            out[kind] = None
    return list(out)


def word_tags(words: Sequence[str], tokens: TextTokens, tags: Sequence[int], outside: int) -> list[int]:
    """One tag per word of ``words`` (the text is the words joined by single spaces): the tag of
    each word's first token (``tags``: one predicted tag index per token); ``outside`` for words
    no token covers (cut by truncation)."""
    starts, pos = [], 0
    for w in words:
        starts.append(pos)
        pos += len(w) + 1
    out = [outside] * len(words)
    seen = [False] * len(words)
    for i, (start, end) in enumerate(tokens.offsets):
        if tokens.special[i] or end <= start:
            continue
        k = bisect_right(starts, start) - 1
        if 0 <= k < len(words) and start < starts[k] + len(words[k]) and not seen[k]:
            out[k], seen[k] = int(tags[i]), True
    return out


# -- answers: what each kind's hooks in the head-kind table return ---------------------------------
@dataclass(frozen=True)
class Answering:
    """What a kind's ``predict`` hook reads besides a head's logits.

    Attributes:
        labels: the head's label names in logit order.
        thresholds: each label's threshold (:func:`label_thresholds`).
        texts: the texts, in input order.
        tokens: each text's tokens (token heads only; empty otherwise).
        padding_side: where the tokenizer padded the batch.
        aggregation: how a token head's word pieces become entities (:data:`AGGREGATIONS`).
    """

    labels: Sequence[str]
    thresholds: Sequence[float] = ()
    texts: Sequence[str] = ()
    tokens: Sequence[TextTokens] = ()
    padding_side: str = "right"
    aggregation: str = "first"


def single_label_answers(logits: torch.Tensor, ctx: Answering) -> list[dict[str, Any]]:
    """``{"label", "score"}`` per text: the most probable label and its softmax probability."""
    score, idx = logits.softmax(dim=-1).max(dim=-1)
    return [{"label": ctx.labels[i], "score": float(s)} for i, s in zip(idx.tolist(), score.tolist())]


def multi_label_answers(logits: torch.Tensor, ctx: Answering) -> list[dict[str, Any]]:
    """:func:`multi_label_result` per text of the sigmoid probabilities."""
    return [multi_label_result(p, ctx.labels, ctx.thresholds) for p in sigmoid(logits.numpy())]


def token_answers(logits: torch.Tensor, ctx: Answering) -> list[list[dict[str, Any]]]:
    """Each text's :func:`entity_spans` from its rows of the padded per-token logits ``[n, T, C]``."""
    return [
        entity_spans(text, tok, softmax(token_rows(row, len(tok), ctx.padding_side)), ctx.labels, ctx.aggregation)
        for text, tok, row in zip(ctx.texts, ctx.tokens, logits.numpy())
    ]


def label_answer(probs: np.ndarray, labels: Sequence[str], thresholds: Sequence[float | None]) -> dict[str, Any]:
    """A served single-label answer of one text's probabilities ``[C]``: the most probable label,
    its probability and every label's."""
    k = int(probs.argmax())
    return {"label": labels[k], "score": float(probs[k]), "probabilities": {n: float(v) for n, v in zip(labels, probs)}}


def label_set_answer(probs: np.ndarray, labels: Sequence[str], thresholds: Sequence[float | None]) -> dict[str, Any]:
    """A served multi-label answer of one text's probabilities ``[C]``: every label's probability
    and the labels at or above their thresholds (None: never)."""
    return {
        "probabilities": {n: float(v) for n, v in zip(labels, probs)},
        "labels": [n for n, v, c in zip(labels, probs, thresholds) if c is not None and v >= c],
    }


def entity_answer(spans: Sequence[Mapping[str, Any]], labels: Sequence[str], thresholds: Any = ()) -> dict[str, Any]:
    """A served token-head answer: the text's entity spans."""
    return {"entities": [dict(s) for s in spans]}
