"""Stock transformers classifiers filled through the one checked reader.

Statistics, fine-tuning and the expert passes of the data stages run a family's stock
``*ForSequenceClassification`` / ``*ForTokenClassification``. :func:`stock_model` builds it from
the folder's checked ``config.json`` and fills it with tensors read by
:class:`~guardmerge.models.checkpoint.Checkpoint`, never by transformers' own loader, so every
file, dtype and NaN rule holds here too. A tensor the class needs and the folder lacks is an
error unless the caller names it as freshly initialised (a new head when fine-tuning a base).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from guardmerge.errors import CheckpointError
from guardmerge.io.checkpoint import INTEGER_BUFFERS
from guardmerge.io.formats import clip
from guardmerge.models.checkpoint import Checkpoint
from guardmerge.models.head_kinds import MULTI_LABEL_PROBLEM_TYPE
from guardmerge.models.modules import no_init

log = logging.getLogger(__name__)

_LABEL_KEYS = ("id2label", "label2id", "num_labels", "problem_type")


def stock_model(
    source: str | Path | Checkpoint,
    *,
    token: bool = False,
    labels: Sequence[str] | None = None,
    multi_label: bool = False,
    fresh: Sequence[str] = (),
    allow_pickle: bool = False,
    where: str | None = None,
    architecture: bool = False,
) -> Any:
    """The family's stock sequence (or, with ``token``, token) classifier of ``source`` (a folder or
    hub id, or a checkpoint already open: a merge job's, read again, not reopened), in eval mode.

    Args:
        architecture: build the transformers class the config names (``architectures[0]``,
            e.g. ``LlamaForCausalLM``) instead, in the stored dtypes.
        labels: label names of a new head (fine-tuning); default: the folder's own.
        multi_label: a new head is multi-label (``problem_type: multi_label_classification``).
        fresh: canonical-name prefixes the class may initialise itself when the folder lacks
            them (``classifier.`` for a new head, ``pooler.`` for a base without a pooler); any
            other missing tensor is an error.

    Raises:
        CheckpointError: a refused folder or tensor (see :mod:`guardmerge.io.checkpoint`), a
            tensor whose shape differs from the class's, or one the class needs and lacks.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    opened = None if isinstance(source, Checkpoint) else Checkpoint(source, allow_pickle=allow_pickle, where=where)
    with opened or nullcontext(source) as ck:
        assert isinstance(ck, Checkpoint)
        config = _stock_config(ck, labels, multi_label)
        try:
            cfg = AutoConfig.for_model(**config)
        except Exception as exc:  # transformers raises ValueError, TypeError, KeyError on bad configs
            raise CheckpointError(f"{ck.where}: config.json is not a usable config: {clip(exc, 200)}") from None
        cls: Any = (_architecture(config, ck.where) if architecture else None) or (
            AutoModelForTokenClassification if token else AutoModelForSequenceClassification
        )
        with nullcontext() if fresh else no_init():  # every tensor is loaded below unless fresh
            model = cls.from_config(cfg) if hasattr(cls, "from_config") else cls(cfg)
        tied = _tied(model)
        state = _stock_state(ck, model, tied, new_head=labels is not None, fresh=fresh, stored_dtypes=architecture)
        model.load_state_dict(state, strict=False, assign=architecture)
        if tied and hasattr(model, "tie_weights"):
            model.tie_weights()
    return model.eval()


def _stock_config(ck: Checkpoint, labels: Sequence[str] | None, multi_label: bool) -> dict[str, Any]:
    """The folder's config without guardmerge's entry; with ``labels``, a new head's label fields."""
    config = {k: v for k, v in ck.config.items() if k != "guardmerge"}
    if labels is not None:
        config = {k: v for k, v in config.items() if k not in _LABEL_KEYS}
        config.update(
            num_labels=len(labels),
            id2label={str(i): n for i, n in enumerate(labels)},
            label2id={n: i for i, n in enumerate(labels)},
        )
        if multi_label:
            config["problem_type"] = MULTI_LABEL_PROBLEM_TYPE
    return config


def _stock_state(
    ck: Checkpoint,
    model: Any,
    tied: dict[str, str],
    *,
    new_head: bool,
    fresh: Sequence[str],
    stored_dtypes: bool,
) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` read from ``ck``: every shape checked, every tensor the class
    needs accounted for (only ``fresh`` prefixes and tied copies may be left to the class)."""
    ad = ck.adapter
    own = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    skipped = []
    for name in ck.names():
        if ad.is_ignored(name) or (name.endswith(INTEGER_BUFFERS) and ad.prefixed(name) not in own):
            continue
        key = ad.prefixed(name)
        if key not in own or (new_head and ad.is_head(name)):  # a new head replaces a stored one
            skipped.append(name)
            continue
        if tuple(own[key].shape) != ck.shape(name):
            raise CheckpointError(
                f"{ck.where}: tensor '{clip(name)}' has shape {list(ck.shape(name))}, the stock "
                f"{type(model).__name__} needs {list(own[key].shape)}"
            )
        state[key] = ck.get(name, None if stored_dtypes else own[key].dtype)
    missing = [
        k
        for k in own
        if k not in state
        and not k.endswith(INTEGER_BUFFERS)
        and not ad.canonical(k).startswith(tuple(fresh))
        and not (k in tied and tied[k] in state)
    ]
    if missing:
        raise CheckpointError(
            f"{ck.where}: tensor '{clip(ad.canonical(missing[0]))}' is missing (the stock {type(model).__name__} "
            "needs it; guardmerge never fills a missing weight with random values)"
        )
    if skipped:
        log.info("%s: %d stored tensor(s) not used (e.g. %s)", ck.where, len(skipped), skipped[0])
    new = sorted({ad.canonical(k).split(".")[0] for k in own if k not in state and not k.endswith(INTEGER_BUFFERS)})
    if new:
        log.info("%s: freshly initialised: %s", ck.where, ", ".join(new))
    return state


def _architecture(config: dict[str, Any], where: str) -> Any:
    """The transformers class ``config["architectures"][0]`` names (None when it names none)."""
    import transformers

    names = config.get("architectures")
    if not names:
        return None
    name = names[0] if isinstance(names, list) and isinstance(names[0], str) else None
    cls = getattr(transformers, name, None) if name else None
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise CheckpointError(f"{where}: config.json 'architectures' names no transformers model class")
    return cls


def _tied(model: Any) -> dict[str, str]:
    """Parameter name -> the name of the parameter it is tied to (``lm_head.weight`` ->
    ``model.embed_tokens.weight``), for the weights a model shares by construction."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            out[name] = first[id(param)]
        else:
            first[id(param)] = name
    return out
