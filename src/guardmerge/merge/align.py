"""Head alignment after merging (docs/algorithms.md 3b): runs the models, then refits in closed form.

For each task, the expert and the merged encoder read the same n unlabelled texts of that task.
A single-Linear head is refit by ridge least squares from the merged head inputs to the expert's
logits; a head with a hidden layer keeps its layers and absorbs an affine map (merged head input
-> expert head input) into its first layer; ``moments`` matches per-feature mean and std only.
Multi-label heads fit their logits exactly as softmax heads do; a token head fits per-token
logits, one row per non-padding token of the texts (word-level texts are words joined by spaces).
The encoder is never touched. Expert features do not depend on the merge, so they are cached
(in memory, and on disk when a cache folder is given): a search or a benchmark pays for them once.
The math lives in :mod:`guardmerge.merge.fits`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from guardmerge.config import AlignConfig
from guardmerge.errors import GuardmergeError
from guardmerge.merge.fits import affine_map, compose_linear, moment_match, ridge_refit
from guardmerge.models.head_kinds import HeadKind
from guardmerge.models.heads import Head
from guardmerge.models.multihead import MultiHeadModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Features:
    """One model's view of a task's texts: head inputs ``[n, d]`` and logits ``[n, C]`` (a token
    head: one row per non-padding token)."""

    head_inputs: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def head_features(
    model: MultiHeadModel, task: str, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 128
) -> Features:
    """Run ``model`` once over ``texts``: the head ``task``'s input and its logits (a token head's
    on the non-padding tokens, text by text)."""
    head: Head = model.heads[task]  # type: ignore[assignment]
    ins, outs = [], []
    for start in range(0, len(texts), batch_size):
        batch = model.encode(texts[start : start + batch_size], max_length)
        x = model.head_inputs(task=task, **batch)[head.spec.input]  # a branched model's are per task
        if head.spec.kind.per_token:  # [B, T, d] -> [tokens, d]
            x = x[batch["attention_mask"].bool()]
        ins.append(x.double())
        outs.append(head(x).double())
    return Features(torch.cat(ins), torch.cat(outs))


@dataclass
class FeatureCache:
    """Expert features keyed by (expert folder, its weights' size and mtime, texts, max_length)."""

    folder: Path | None = None
    _memory: dict[str, Features] = field(default_factory=dict)
    allow_pickle: bool = False  # expert folders with only pytorch_model.bin are refused unless True

    @staticmethod
    def key(expert: str | Path, texts: Sequence[str], max_length: int) -> str:
        h = hashlib.sha256(str(Path(expert).resolve()).encode())
        for f in sorted(Path(expert).glob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(str(max_length).encode())
        for t in texts:
            h.update(t.encode() + b"\0")
        return h.hexdigest()[:20]

    def get(
        self,
        expert: str | Path,
        task: str,
        texts: Sequence[str],
        max_length: int,
        batch_size: int,
        model: Callable[[], MultiHeadModel] | None = None,
    ) -> Features:
        """The expert's features on ``texts``: cached, or computed with ``model()`` (the expert as a
        one-head model; default: read from the ``expert`` folder)."""
        key = self.key(expert, texts, max_length)
        if key in self._memory:
            return self._memory[key]
        path = self.folder / f"{key}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            data = load_file(str(path))
            feats = Features(data["head_inputs"], data["logits"])
        else:
            one = (
                model()
                if model is not None
                else MultiHeadModel.from_classifier(expert, task, allow_pickle=self.allow_pickle)
            )
            feats = head_features(one, task, texts, batch_size=batch_size, max_length=max_length)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({"head_inputs": feats.head_inputs, "logits": feats.logits}, str(path))
        self._memory[key] = feats
        return feats


@torch.no_grad()
def refit_head(head: Head, merged: Features, expert: Features, cfg: AlignConfig) -> dict[str, float]:
    """Replace ``head``'s weights in place; return fit diagnostics on the fitting texts."""
    first = head.linears[0]
    x = merged.head_inputs.to(first.weight.dtype)
    if merged.head_inputs.shape[0] != expert.logits.shape[0]:
        raise GuardmergeError(
            f"head alignment: {merged.head_inputs.shape[0]} merged rows but {expert.logits.shape[0]} expert rows "
            "(the merged model and the expert tokenise the texts differently)"
        )
    kind = head.spec.kind
    before = _fit(head(x), expert.logits, kind)
    if cfg.method == "moments":
        scale, shift = moment_match(merged.head_inputs, expert.head_inputs)
        w, b = compose_linear(first.weight, first.bias, scale, shift)
    elif len(head.layers) == 1:
        w, b = ridge_refit(merged.head_inputs, expert.logits, cfg.ridge)
    else:
        m, c = affine_map(merged.head_inputs, expert.head_inputs, cfg.ridge)
        w, b = compose_linear(first.weight, first.bias, m, c)
    first.weight.copy_(w.to(first.weight.dtype))
    first.bias.copy_(b.to(first.bias.dtype))
    after = _fit(head(x), expert.logits, kind)
    return {f"{k}_{when}": v for when, fit in (("before", before), ("after", after)) for k, v in fit.items()}


def _fit(logits: torch.Tensor, expert_logits: torch.Tensor, kind: HeadKind) -> dict[str, float]:
    """Agreement with the expert by the head kind's alignment target (the argmax; a multi-label
    head: each label's decision at 0.5), and the RMS logit error, on the fitting texts (or tokens)."""
    agree = kind.agreement(logits, expert_logits).double().mean()
    return {
        "agreement": float(agree),
        "logit_rmse": float((logits.double() - expert_logits).pow(2).mean().sqrt()),
    }


def align_heads(
    model: MultiHeadModel,
    experts: Mapping[str, str | Path],
    texts: Mapping[str, Sequence[str]],
    cfg: AlignConfig,
    cache: FeatureCache | None = None,
    expert_models: Callable[[str], MultiHeadModel] | None = None,
) -> dict[str, dict[str, float]]:
    """Refit every head of ``model`` that has an expert and texts; return per-task diagnostics.

    Args:
        experts: task -> expert classifier folder.
        texts: task -> unlabelled texts of that task (the first ``cfg.examples`` are used).
        expert_models: task -> the expert as a one-head model (a merge job's, built once from its
            open checkpoint); default: read from the folder when its features are not cached.
    """
    cache = cache or FeatureCache()
    report = {}
    for task, expert in experts.items():
        if task not in texts:
            log.warning("head alignment: no texts for task '%s'; head kept as merged", task)
            continue
        sample = list(texts[task])[: cfg.examples]
        build = (lambda t=task: expert_models(t)) if expert_models is not None else None
        ef = cache.get(expert, task, sample, cfg.max_length, cfg.batch_size, build)
        mf = head_features(model, task, sample, batch_size=cfg.batch_size, max_length=cfg.max_length)
        report[task] = refit_head(model.heads[task], mf, ef, cfg)  # type: ignore[arg-type]
        log.info(
            "aligned head '%s' on %d texts: label agreement with the expert %.3f -> %.3f",
            task,
            len(sample),
            report[task]["agreement_before"],
            report[task]["agreement_after"],
        )
    return report
