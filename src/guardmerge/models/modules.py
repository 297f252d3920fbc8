"""Module helpers of the models wing: building an encoder from its config (optionally without
initialising it), what it pools and reads, and reaching modules by dotted path
(``blocks_at(encoder, "encoder.layer")``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch
from torch import nn

from guardmerge.models.adapters import ArchitectureAdapter, get_adapter

BUFFERS = ("position_ids", "token_type_ids")
"""Encoder buffers that are non-persistent in recent transformers (never required in a folder)."""


def no_init() -> AbstractContextManager[Any]:
    """transformers' ``no_init_weights``: modules are allocated but not initialised (every
    tensor is loaded afterwards, and the loaders refuse a missing one). transformers 5 has it in
    ``transformers.initialization``, 4.x (LLM Guard's environment) in ``modeling_utils``."""
    try:
        from transformers.initialization import no_init_weights
    except ModuleNotFoundError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]

    return cast(AbstractContextManager[Any], no_init_weights())


def transformers_version() -> str:
    """The installed transformers' version (``4.51.3`` in LLM Guard's environment)."""
    import transformers

    return str(transformers.__version__)


def build_encoder(config: Mapping[str, Any], with_pooler: bool, *, empty: bool = False) -> nn.Module:
    """A transformers base model (``BertModel``...) for ``config``: randomly initialised, or with
    ``empty`` allocated without initialisation (the caller loads every tensor: fast, no random
    weights are ever computed)."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "guardmerge"})
    with no_init() if empty else nullcontext():
        return AutoModel.from_config(cfg, **get_adapter(cfg.model_type).encoder_kwargs(with_pooler))


def has_pooler(adapter: ArchitectureAdapter, names: Iterable[str]) -> bool:
    """Whether encoder tensors ``names`` (canonical) include the encoder's pooler."""
    return any(adapter.is_pooler(n) for n in names)


def accepted_inputs(encoder: nn.Module) -> frozenset[str]:
    """The tokenizer outputs ``encoder``'s forward names (``token_type_ids`` only where it does)."""
    params = inspect.signature(encoder.forward).parameters
    return frozenset(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params)


def blocks_at(root: nn.Module, path: str) -> nn.ModuleList:
    """The block list ``root.a.b`` for ``path = "a.b"``."""
    return cast(nn.ModuleList, module_at(root, path))


def module_at(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b`` for ``path = "a.b"``."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def first_output(out: Any) -> torch.Tensor:
    """A module's main output: the first element of a tuple output, or the output itself."""
    return out[0] if isinstance(out, (tuple, list)) else out
