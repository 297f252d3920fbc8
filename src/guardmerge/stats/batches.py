"""Tokenised batches for statistics collection (Grams, Fisher) from plain texts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def tokenize_batches(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    labels: Sequence[int] | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    sort_by_length: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Tokenise ``texts`` into batches padded to their longest member (at most ``max_length``).

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: the inputs.
        labels: optional gold labels (``labels`` key, ``[B]`` long), for empirical Fisher.
        batch_size: examples per batch.
        max_length: truncation length.
        sort_by_length: group texts of similar length (less padding, faster); the statistics are
            the same up to float rounding, since padding is masked out.

    Returns:
        A list of dicts with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the
        tokenizer gives them, ``labels`` where given), each ``[B, T]`` / ``[B]``.
    """
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    order = list(range(len(texts)))
    if sort_by_length:
        order.sort(key=lambda i: len(texts[i]))
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = dict(enc.items())
        if labels is not None:
            batch["labels"] = torch.tensor([int(labels[i]) for i in idx], dtype=torch.long)
        out.append(batch)
    return out
