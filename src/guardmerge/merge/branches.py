"""The branch-alignment stage of a sharing depth (docs/algorithms.md 3a, ``branch_align: true``).

With ``share_layers: K`` each task runs its expert's own blocks ``K..L-1`` on the merged trunk's
output, which drifts from what those blocks were trained on (the expert's own hidden states at
depth K). For each task, the merged model and the task's expert read the same tokenised texts;
over the non-padding tokens, a per-feature affine map from the trunk's hidden states to the
expert's is fitted in closed form (:func:`guardmerge.merge.fits.per_feature_affine`) and set as the
branch's ``align``. Nothing else changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from guardmerge.errors import GuardmergeError
from guardmerge.merge.fits import per_feature_affine
from guardmerge.merge.layerwise import _capture_inputs, blocks_at
from guardmerge.models.multihead import MultiHeadModel
from guardmerge.stats.batches import tokenize_batches

log = logging.getLogger(__name__)


@torch.no_grad()
def branch_hidden(
    model: MultiHeadModel,
    expert: MultiHeadModel,
    task: str,
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(merged [n, d], expert [n, d])``: hidden states at depth K on the non-padding tokens
    of ``texts``: what ``task``'s branch reads before its ``align``, and the expert's input to
    its block K."""
    if task not in model.branches:
        raise GuardmergeError(f"branch alignment needs task '{task}' to have a branch (share_layers below the layers)")
    depth = model.depth(task)
    adapter = model.adapter
    ex = expert.encoder.eval()
    ex_blocks = blocks_at(ex, adapter.blocks or "")
    merged_rows, expert_rows = [], []
    for batch in tokenize_batches(model.tokenizer, list(texts), batch_size=batch_size, max_length=max_length):
        rows = batch["attention_mask"].reshape(-1).bool()
        h = model.branch_input(task, **batch)
        merged_rows.append(h.reshape(-1, h.shape[-1])[rows].double())
        hidden, _ = _capture_inputs(ex, ex_blocks, batch, upto=depth)
        e = hidden[depth]
        expert_rows.append(e.reshape(-1, e.shape[-1])[rows].double())
    return torch.cat(merged_rows), torch.cat(expert_rows)


@torch.no_grad()
def branch_align_stage(
    model: MultiHeadModel,
    experts: Mapping[str, MultiHeadModel],
    texts: Mapping[str, Sequence[str]],
    *,
    ridge: float | None = None,
    max_length: int = 128,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Fit and set every branch's ``align`` of ``model`` in place.

    Args:
        model: a branched merged model (with its tokenizer).
        experts: task -> the expert as a one-head model (same family and tokenizer).
        texts: task -> unlabelled texts.
        ridge: see :func:`~guardmerge.merge.fits.per_feature_affine`.

    Returns:
        A report: ``share_layers``, per task the tokens and the mean squared error of the branch
        input against the expert's, before and after, and seconds.
    """
    started = time.perf_counter()
    if model.tokenizer is None:
        raise GuardmergeError("branch alignment needs the merged model's tokenizer")
    report: dict[str, Any] = {"share_layers": model.share_layers, "tasks": {}}
    for task in model.branches:  # a task sharing every block reads the trunk's top: nothing to align
        if task not in texts or task not in experts:
            raise GuardmergeError(f"branch alignment: no texts or expert for task '{task}'")
        merged, expert = branch_hidden(
            model, experts[task], task, texts[task], max_length=max_length, batch_size=batch_size
        )
        scale, shift = per_feature_affine(merged, expert, ridge)
        model.branch(task).set_align(scale, shift)
        before = float((merged - expert).square().mean())
        after = float((merged * scale + shift - expert).square().mean())
        report["tasks"][task] = {"tokens": int(merged.shape[0]), "mse_before": before, "mse_after": after}
        log.info(
            "branch '%s' aligned at depth %s on %d tokens: hidden-state MSE %.3g -> %.3g",
            task,
            model.depth(task),
            merged.shape[0],
            before,
            after,
        )
    report["seconds"] = time.perf_counter() - started
    return report
