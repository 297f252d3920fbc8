"""Exporting one task of a multi-head model back to a stock transformers folder: an
``AutoModelForSequenceClassification`` (with the head kind's ``problem_type``, e.g.
``multi_label_classification``) or, for a per-token kind, an ``AutoModelForTokenClassification``
without the encoder's pooler. A branched model's task takes the trunk's blocks below K and its
branch's above, with the branch's ``align`` folded into the LayerNorm that feeds the branch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from guardmerge.errors import GuardmergeError
from guardmerge.io import atomic_dir
from guardmerge.models.folder import write_model_folder
from guardmerge.models.heads import HEAD_PREFIX

MultiHeadModel = Any
"""A :class:`~guardmerge.models.multihead.MultiHeadModel`, typed loosely here: that module imports
this one (``export_task`` calls it), and this one never imports it back."""


def export_task(model: MultiHeadModel, task: str, path: str | Path, *, force: bool = False) -> Path:
    """Write ``model``'s ``task`` as a stock ``AutoModelForSequenceClassification`` folder (with
    its kind's ``problem_type``: ``multi_label_classification`` for a multi-label head), or an
    ``AutoModelForTokenClassification`` folder (without the encoder's pooler) for a token head."""
    head = model.head(task)
    spec = head.spec
    ad = model.adapter
    tensors = {ad.prefixed(k): v for k, v in model.encoder.state_dict().items()}
    if task in model.branches:  # layers < K_t from the trunk, the rest (and the pooler) from the branch
        tensors.update(branch_export(model, task))
    # a head that owns its pooler (base checkpoint without one) gives the stock pooler
    head_state = {k[len(f"{HEAD_PREFIX}{task}.") :]: v for k, v in head.state(task).items()}
    biased = stock_biases(model, task, head_state)
    for name, t in head_state.items():
        tensors[ad.prefixed(name)] = t
    tensors = {
        k: v
        for k, v in tensors.items()
        if not k.endswith("position_ids") and not (spec.kind.per_token and ad.is_pooler(ad.canonical(k)))
    }
    cfg = dict(model.config)
    labels = list(spec.labels)
    cfg.update(ad.head_config(spec.layout, biased))
    cfg.update(
        architectures=[ad.stock_class(spec.problem)],
        id2label={str(i): n for i, n in enumerate(labels)},
        label2id={n: i for i, n in enumerate(labels)},
        num_labels=len(labels),
    )
    cfg.pop("problem_type", None)
    if spec.kind.stock_problem_type is not None:
        cfg["problem_type"] = spec.kind.stock_problem_type
    cfg.pop("guardmerge", None)
    with atomic_dir(path, force=force) as tmp:
        write_model_folder(tmp, tensors, cfg, model.tokenizer)
    return Path(path)


def stock_biases(model: MultiHeadModel, task: str, head_state: dict[str, torch.Tensor]) -> list[str]:
    """Drop (in place) the zero biases of ``task``'s head that its stock head lacks; return the
    head layers that keep a bias the stock config must switch on (a bias fitted by head
    alignment where the stock head has none)."""
    spec = model.spec(task)
    # the biases the stock config leaves out
    stock = model.adapter.head_layout(model.config, problem=spec.problem).no_bias
    switchable = {layer for layer, _ in model.adapter.head_bias_keys}
    biased = []
    for module in (*spec.layers, *spec.norms):
        if module not in stock:
            continue
        if not bool(head_state[f"{module}.bias"].any()):
            del head_state[f"{module}.bias"]
        elif module in switchable:
            biased.append(module)
        else:
            raise GuardmergeError(
                f"task '{task}': '{module}' has a non-zero bias, which a stock "
                f"{model.adapter.stock_class(spec.problem)} with this config cannot hold"
            )
    return biased


def branch_export(model: MultiHeadModel, task: str) -> dict[str, torch.Tensor]:
    """``task``'s branch under stock names, its ``align`` folded into the LayerNorm that
    produces the branch input (block K-1's output norm, or the embeddings norm at K = 0)."""
    ad, branch = model.adapter, model.branch(task)
    state = branch.state()
    scale, shift = state.pop("align.scale", None), state.pop("align.shift", None)
    out = {ad.prefixed(k): v for k, v in state.items()}
    if scale is None or shift is None:
        return out
    depth = branch.start
    trunk = {**model.encoder.state_dict(), **state}
    project = ad.embeddings_project
    if depth == 0 and project and f"{project}.weight" in trunk:
        norm: str | None = project  # the projection (a Linear) produces the blocks' input
    elif depth > 0:
        norm = f"{ad.blocks}.{depth - 1}.{ad.block_output_norm}" if ad.block_output_norm else None
    else:
        norm = ad.embeddings_norm
    if norm is None:
        raise GuardmergeError(
            f"task '{task}': cannot fold the branch alignment into a stock "
            f"{ad.model_type} model (no LayerNorm produces block {depth - 1}'s output)"
        )
    for kind in ("weight", "bias"):
        if f"{norm}.{kind}" not in trunk:
            raise GuardmergeError(f"task '{task}': tensor '{norm}.{kind}' not found to fold align into")
    w, b = trunk[f"{norm}.weight"], trunk[f"{norm}.bias"]
    s64, c64 = scale.double(), shift.double()
    rows = s64.reshape(-1, *([1] * (w.dim() - 1)))  # per output feature: a LayerNorm's or a Linear's
    out[ad.prefixed(f"{norm}.weight")] = (w.double() * rows).to(w.dtype)
    out[ad.prefixed(f"{norm}.bias")] = (b.double() * s64 + c64).to(b.dtype)
    return out
