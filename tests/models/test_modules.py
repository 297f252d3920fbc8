"""Module helpers: modules by dotted path, a module's main output, what an encoder reads and pools."""

from __future__ import annotations

import torch
from torch import nn

from guardmerge.models.adapters import get_adapter
from guardmerge.models.modules import accepted_inputs, blocks_at, first_output, has_pooler, module_at


def test_modules_by_dotted_path_and_first_outputs() -> None:
    root = nn.Module()
    root.encoder = nn.Module()
    root.encoder.layer = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    assert module_at(root, "encoder.layer.1") is root.encoder.layer[1]
    assert blocks_at(root, "encoder.layer") is root.encoder.layer
    t = torch.ones(1)
    assert first_output((t, None)) is t and first_output(t) is t


def test_an_encoder_reads_only_the_inputs_its_forward_names() -> None:
    class Encoder(nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return input_ids

    assert accepted_inputs(Encoder()) == frozenset({"input_ids", "attention_mask"})
    bert = get_adapter("bert")
    assert has_pooler(bert, ["pooler.dense.weight", "embeddings.word_embeddings.weight"])
    assert not has_pooler(bert, ["embeddings.word_embeddings.weight"])
