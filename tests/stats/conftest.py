"""Tiny random BERT-family classifiers and token batches for the statistics tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from transformers import (  # imported at collection, so that no test pays for the import
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB = 100


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(kind: str = "bert", num_labels: int = 3, seed: int = 0) -> torch.nn.Module:
    """A tiny random ``*ForSequenceClassification`` (hidden 16, 2 layers), in eval mode."""
    torch.manual_seed(seed)
    shared = {"vocab_size": VOCAB, "num_labels": num_labels, "max_position_embeddings": 64}
    bert_like = {**shared, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(**bert_like))
    elif kind == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**bert_like, pad_token_id=1))
    elif kind == "distilbert":
        model = DistilBertForSequenceClassification(
            DistilBertConfig(**shared, dim=16, n_layers=2, n_heads=2, hidden_dim=32)
        )
    else:
        raise ValueError(kind)
    return model.eval()


def make_batch(
    lengths: list[int],
    seq_len: int | None = None,
    seed: int = 0,
    pad_id: int = 0,
    num_labels: int = 3,
) -> dict[str, torch.Tensor]:
    """Random token ids, right-padded with ``pad_id`` to ``seq_len`` (default: the longest)."""
    gen = torch.Generator().manual_seed(seed)
    t = seq_len or max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), t), generator=gen)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = pad_id
    labels = torch.randint(0, num_labels, (len(lengths),), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}


@pytest.fixture
def model_factory() -> Callable[..., torch.nn.Module]:
    return tiny_model


@pytest.fixture
def batch_factory() -> Callable[..., dict[str, torch.Tensor]]:
    return make_batch
