"""A merged model held as tensors (:class:`MergeResult`): what the tensor merge and the data
stages produce, and what the write path turns into a model folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guardmerge.errors import GuardmergeError
from guardmerge.models.folder import load_tokenizer, model_from_tensors
from guardmerge.models.heads import HeadSpec
from guardmerge.models.multihead import MultiHeadModel

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """A merged model held as tensors, ready to save or to turn into a module.

    Attributes:
        tensors: canonical encoder tensors, ``heads.<task>.<layer>.*`` head tensors and, with
            ``share_layers``, ``branches.<task>.<canonical name>`` branch tensors.
        config: the encoder config dict (from the first expert, head fields removed).
        heads: task -> :class:`HeadSpec`.
        info: provenance recorded in ``config.json`` and the model card.
        tokenizer_dir: folder whose tokenizer the output carries.
    """

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    heads: dict[str, HeadSpec]
    info: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: Path | None = None

    def to_model(self, tokenizer: Any = None) -> MultiHeadModel:
        """An in-memory :class:`MultiHeadModel` (no disk round trip)."""
        if self.info.get("heads_mode") == "shared":
            raise GuardmergeError(
                "a heads: shared merge is one stock transformers model, not a multi-head model; "
                "write it (guardmerge merge) and load it with transformers"
            )
        if tokenizer is None and self.tokenizer_dir is not None:
            tokenizer = load_tokenizer(self.tokenizer_dir)
        tensors, info = self.tensors, self.info
        return model_from_tensors(MultiHeadModel, self.config, self.heads, tensors, info, tokenizer, strict=False)
