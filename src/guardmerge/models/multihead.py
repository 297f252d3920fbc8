"""The merged artifact: one shared encoder, one classification head per task.

One encoder pass per batch, then every head; softmax per head (HM3, Hackmann 2024). The folder
format is plain: ``model.safetensors`` (encoder tensors under their canonical names, head
tensors under ``heads.<task>.<layer>.{weight,bias}``), ``config.json`` (the encoder's
transformers config plus a ``guardmerge`` section describing the heads), the tokenizer, the
merge config and a model card (:mod:`guardmerge.models.folder`). Any single task exports back to
a stock ``AutoModelForSequenceClassification`` folder (``AutoModelForTokenClassification`` for a
token head; :mod:`guardmerge.models.stock_export`).

**Head kinds** (:attr:`HeadSpec.problem`): ``single_label`` (softmax), ``multi_label`` (a sigmoid
per label; labels at or above their thresholds) and ``token`` (per-token logits ``[B, T, C]`` read
from the last hidden states; entity spans in :meth:`MultiHeadModel.predict`). What differs
between them is one entry each in :data:`guardmerge.models.head_kinds.HEAD_KINDS`; the heads
themselves are :mod:`guardmerge.models.heads`.

**Sharing depth** (``share_layers: K`` below the number of blocks ``L``): the encoder is a
*trunk* of the K shared blocks; each task owns a :class:`~guardmerge.models.branches.Branch`
(its expert's blocks ``K..L-1``, its pooler where the family has one, and an optional
per-feature affine ``align`` applied to the trunk's output first) stored under
``branches.<task>.<canonical name>`` (``branches.hate.encoder.layer.3.attention.self.query.weight``,
``branches.hate.pooler.dense.bias``, ``branches.hate.align.scale`` / ``.shift``); ``config.json``
records ``guardmerge.share_layers``. The trunk runs once per batch, then each requested task's
branch. With a depth per task (``share_layers: {default: K, TASK: K_t}``) the trunk runs
``max K_t`` blocks (the whole encoder, pooler included, when some task shares every block: that
task has no branch and reads the trunk's top); a task sharing fewer blocks branches from the
input of trunk block ``K_t``, kept by a :class:`~guardmerge.models.branches.Tap`. At ``K = 0``
each branch also owns its expert's embeddings (``branches.<task>.embeddings.*``)
so every task reproduces its expert exactly; the trunk's (merged) embeddings then only form the
blocks' attention arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from guardmerge.errors import GuardmergeError, NonFiniteOutputError
from guardmerge.io.formats import read_config
from guardmerge.models.adapters import ArchitectureAdapter, get_adapter
from guardmerge.models.branches import BRANCH_PREFIX, Branch, Call, Capture, Tap
from guardmerge.models.folder import load_folder, model_from_classifier, save_folder
from guardmerge.models.head_kinds import HeadKind, kinds_where
from guardmerge.models.heads import Head, HeadSpec
from guardmerge.models.modules import accepted_inputs, blocks_at
from guardmerge.models.outputs import AGGREGATIONS, Answering, TextTokens, label_thresholds, text_tokens
from guardmerge.models.stock_export import export_task

if TYPE_CHECKING:
    from guardmerge.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)


class MultiHeadModel(nn.Module):
    """A shared encoder with one head per task (and, with a sharing depth, one branch per task).

    Args:
        encoder: a transformers base model (``BertModel``, ``RobertaModel``, ``DistilBertModel``);
            with ``branches``, a trunk made by :func:`cut_trunk`.
        heads: task -> :class:`Head`.
        config: the encoder's config dict (``config.json`` minus the ``guardmerge`` section).
        info: provenance (base, experts, method, parameters, version) for the model card.
        tokenizer: a transformers tokenizer, needed by :meth:`predict`.
        branches: task -> :class:`Branch` (every head needs one), or None: single-pass model.
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, Head],
        config: Mapping[str, Any],
        info: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
        branches: Mapping[str, Branch] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.branches = nn.ModuleDict(dict(branches or {}))
        self.config = dict(config)
        self.info = dict(info or {})
        self.tokenizer = tokenizer
        self.adapter: ArchitectureAdapter = get_adapter(str(self.config["model_type"]))
        self.inputs = accepted_inputs(encoder)
        self.taps = nn.ModuleDict()
        if self.branches:
            self._check_branches()
            self.info["share_layers"] = self.share_layers
            self.info["blocks_per_pass"] = self.blocks_per_pass
        self.eval()

    def _check_branches(self) -> None:
        """Every head has a branch (a trunk cut at its branch point) or reads the whole trunk's
        top; a branch starting below the trunk's top gets a :class:`Tap` on its first block."""
        cut = self._branch_point() is not None
        lacking = [t for t in self.heads if t not in self.branches]
        if not cut and not lacking:
            raise GuardmergeError("a model with branches needs a trunk cut at the branch point (cut_trunk)")
        extra = [t for t in self.branches if t not in self.heads]
        if (lacking and cut) or extra:
            raise GuardmergeError(
                f"every head needs one branch: heads without a branch {lacking}, branches without a head {extra}"
            )
        top = self.trunk_blocks
        starts = {self.branch(t).start for t in self.branches}
        above = sorted(k for k in starts if k > top or (k == top and not cut))
        if above:
            raise GuardmergeError(f"branches start at block {above[0]}, at or above the trunk's top ({top} blocks)")
        blocks = blocks_at(self.encoder, self.adapter.blocks or "")
        for depth in sorted(k for k in starts if k < top):
            self.taps[str(depth)] = tap = Tap()
            tap.attach(blocks[depth])

    # -- structure -----------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def labels(self, task: str) -> list[str]:
        return list(self.head(task).spec.labels)

    def head(self, task: str) -> Head:
        """``task``'s :class:`Head` (an unknown task is named with the known ones)."""
        if task not in self.heads:
            raise GuardmergeError(f"unknown task '{task}'; this model has: {', '.join(self.tasks)}")
        return self.heads[task]  # type: ignore[return-value]

    def _branch_point(self) -> Capture | None:
        if self.adapter.blocks is None:
            return None
        blocks = blocks_at(self.encoder, self.adapter.blocks)
        last = blocks[-1] if len(blocks) else None
        return last if isinstance(last, Capture) else None

    @property
    def share_layers(self) -> int | dict[str, int] | None:
        """The sharing depth K of a branched model, task -> ``K_t`` where the tasks' depths
        differ (None: every layer shared, one pass)."""
        if not self.branches:
            return None
        depths = {t: self.depth(t) for t in self.tasks}
        if self._branch_point() is not None and len(set(depths.values())) == 1:
            return next(iter(depths.values()))
        return depths

    @property
    def trunk_blocks(self) -> int:
        """The blocks the encoder (trunk) runs: ``max K_t`` of a branched model (0 for a family
        without a block list)."""
        count = len(blocks_at(self.encoder, self.adapter.blocks)) if self.adapter.blocks else 0
        return count - 1 if self._branch_point() is not None else count

    @property
    def trunk_cut(self) -> int | None:
        """The depth where the trunk ends at its branch point (every task then has a branch), or
        None when the encoder runs whole (a single-pass model, or some task reads its top)."""
        return self.trunk_blocks if self._branch_point() is not None else None

    @property
    def blocks_per_pass(self) -> int:
        """Blocks one forward pass over every task runs: the trunk's plus each branch's own."""
        return self.trunk_blocks + sum(len(self.branch(t).blocks) for t in self.branches)

    def depth(self, task: str) -> int:
        """``task``'s sharing depth ``K_t``: where its branch starts, or the trunk's top without one."""
        self.head(task)
        return self.branch(task).start if task in self.branches else self.trunk_blocks

    def branch(self, task: str) -> Branch:
        """``task``'s :class:`Branch` (a branched model only)."""
        self.head(task)
        if task not in self.branches:
            raise GuardmergeError(f"this model has no branches (share_layers unset): task '{task}' has none")
        return self.branches[task]  # type: ignore[return-value]

    # -- inference -----------------------------------------------------------------------
    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tasks: Sequence[str] | None = None,
        **extra: torch.Tensor,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{task: {"cls": [B, d], "pooled": [B, d]}}``: the encoder (trunk) runs once, then
        each task's branch on the trunk's output when the model has branches."""
        chosen = list(tasks) if tasks is not None else self.tasks
        extra = self._extra(extra)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        mask = self._mean_mask(attention_mask)
        points = self._branch_inputs(out[0])
        shared = None
        inputs = {"input_ids": input_ids, **extra}
        feats = {}
        for t in chosen:
            if t in self.branches:
                hidden, pooled = self.branch(t)(*points[self.depth(t)], inputs)
                feats[t] = _feats(hidden, pooled, mask)
                continue
            if shared is None:  # the trunk's top: every task without a branch reads it
                shared = _feats(out[0], getattr(out, "pooler_output", None), mask)
            feats[t] = shared
        return feats

    def _branch_inputs(self, top: torch.Tensor) -> dict[int, tuple[torch.Tensor, Call]]:
        """Depth -> ``(hidden states, block call)`` at every branch point of the trunk pass just
        run (each taken, so no tensors outlive it); ``top`` is the trunk's last hidden states."""
        points: dict[int, tuple[torch.Tensor, Call]] = {}
        point = self._branch_point()
        if point is not None:
            points[self.trunk_blocks] = (top, point.take())
        for depth, tap in self.taps.items():
            points[int(depth)] = tap.take()  # type: ignore[operator]
        return points

    def _mean_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask for ``"mean"`` pooling when a head reads it (None: no head does)."""
        if not any(h.spec.input == "mean" for h in self.heads.values()):  # type: ignore[union-attr]
            return None
        if attention_mask is None:
            raise GuardmergeError("mean pooling needs the attention mask")
        return attention_mask

    def _extra(self, extra: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The extra tokenizer outputs the encoder takes (``token_type_ids`` where it does)."""
        return {k: v for k, v in extra.items() if k in self.inputs}

    def head_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None, **extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Run the encoder once: ``{"pooled": [B, d], "cls": [B, d]}`` (what heads read).

        A branched model's features are per task: ``task`` names whose (required there).
        """
        if not self.branches:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **self._extra(extra))
            return _feats(out[0], getattr(out, "pooler_output", None), self._mean_mask(attention_mask))
        if task is None:  # even where some heads read the trunk's top: the features differ per task
            raise GuardmergeError(f"this model branches at layer {self.share_layers}: head_inputs needs the task")
        return self.features(input_ids, attention_mask, [task], **extra)[task]

    def branch_input(
        self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor
    ) -> torch.Tensor:
        """``[B, T, d]``: what ``task``'s branch reads before its ``align`` (the trunk's hidden
        states at depth ``K_t``, or the branch's own embeddings at ``K_t = 0``)."""
        branch = self.branch(task)
        extra = self._extra(extra)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        hidden, _ = self._branch_inputs(out[0])[branch.start]
        return branch.entry(hidden, {"input_ids": input_ids, **extra})

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tasks: Sequence[str] | None = None,
        **extra: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``{task: logits [B, C_task]}`` (a token head: ``[B, T, C_task]``) from one encoder
        (trunk) pass, then each task's branch."""
        chosen = list(tasks) if tasks is not None else self.tasks
        heads = {t: self.head(t) for t in chosen}
        feats = self.features(input_ids, attention_mask, chosen, **extra)
        return {t: heads[t](feats[t][heads[t].spec.input]) for t in chosen}

    def spec(self, task: str) -> HeadSpec:
        """``task``'s :class:`HeadSpec` (labels, layers, kind, thresholds)."""
        return self.head(task).spec

    def problem(self, task: str) -> str:
        """``task``'s head kind: ``single_label``, ``multi_label`` or ``token``."""
        return self.spec(task).problem

    def kind(self, task: str) -> HeadKind:
        """``task``'s entry in the head-kind table (:mod:`guardmerge.models.head_kinds`)."""
        return self.spec(task).kind

    def token_length(self, max_length: int | None = None) -> int:
        """Tokens per text that :meth:`encode` keeps (``max_length``, default 512, capped at the
        model's positions)."""
        from guardmerge.models.adapters import capped_length

        return capped_length(max_length or 512, self.config, "encode", level=logging.DEBUG)

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenise ``texts`` with the model's tokenizer (padded batch tensors)."""
        if self.tokenizer is None:
            raise GuardmergeError("this model has no tokenizer; load it from a saved folder")
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.token_length(max_length),
            return_tensors="pt",
        )
        return {k: v for k, v in batch.items() if k in self.inputs}

    def text_tokens(self, texts: Sequence[str], max_length: int | None = None) -> list[TextTokens]:
        """Each text's tokens as :meth:`encode` makes them, with character offsets (a fast
        tokenizer is needed): what turns a token head's rows into entity spans."""
        return text_tokens(self.tokenizer, texts, self.token_length(max_length))

    @property
    def padding_side(self) -> str:
        """Where the tokenizer pads a batch (``right`` for encoders)."""
        return str(getattr(self.tokenizer, "padding_side", "right") or "right")

    @torch.no_grad()
    def logits(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        tasks: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{task: logits [len(texts), C_task]}``, input order kept; a token head's are
        ``[len(texts), T, C_task]``, padded to the longest text (on the tokenizer's padding side)
        with zeros.

        Raises:
            NonFiniteOutputError: a head's scores for a text are NaN or infinite (no verdict).
        """
        chosen = list(tasks) if tasks is not None else self.tasks
        parts: dict[str, list[torch.Tensor]] = {t: [] for t in chosen}
        for start in range(0, len(texts), batch_size):
            batch = self.encode(texts[start : start + batch_size], max_length)
            for task, out in self(tasks=chosen, **batch).items():
                parts[task].append(out.float())
        logits = {t: self.concat_logits(t, p) for t, p in parts.items()}
        for task, values in logits.items():  # a guard fails closed: no verdict from NaN or infinity
            bad = (~torch.isfinite(values.reshape(len(values), -1))).any(dim=-1).nonzero()
            if len(bad):
                raise NonFiniteOutputError(
                    f"head '{task}' produced NaN or infinite scores for text {int(bad[0])} "
                    f"({len(bad)} of {len(values)} texts); no verdict is given"
                )
        return logits

    def concat_logits(self, task: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``task``'s batches of logits as one tensor (a token head's padded, on the tokenizer's
        padding side, to the longest batch with zeros)."""
        classes = len(self.labels(task))
        if not self.kind(task).per_token:
            return torch.cat(list(parts)) if parts else torch.empty(0, classes)
        if not parts:
            return torch.empty(0, 0, classes)
        width = max(p.shape[1] for p in parts)
        left = self.padding_side == "left"
        padded = []
        for p in parts:
            gap = width - p.shape[1]
            padded.append(torch.nn.functional.pad(p, (0, 0, gap, 0) if left else (0, 0, 0, gap)))
        return torch.cat(padded)

    def predict(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        tasks: Sequence[str] | None = None,
        thresholds: Mapping[str, float | Mapping[str, float]] | None = None,
        aggregation: str = "first",
    ) -> dict[str, list[Any]]:
        """Every head's answer, per text in input order:

        - single-label heads: ``{"label": str, "score": float}`` (the softmax probability);
        - multi-label heads: ``{"labels": [names at or above their thresholds], "probabilities":
          {name: sigmoid probability}}``;
        - token heads: the text's entity spans ``[{"label": entity type, "start": int, "end": int,
          "text": str, "score": float}]`` (character offsets into the text).

        Args:
            thresholds: task -> one threshold for every label, or label -> threshold, of a
                multi-label head (default: the head's own thresholds, else 0.5).
            aggregation: how a token head's word pieces become entities: ``first`` (each word
                takes its first piece's label) or ``simple`` (each piece its own), as in
                transformers' token-classification pipeline.
        """
        if isinstance(texts, str):
            texts = [texts]
        if aggregation not in AGGREGATIONS:
            raise GuardmergeError(f"unknown aggregation '{aggregation}'; use one of {', '.join(AGGREGATIONS)}")
        chosen = list(tasks) if tasks is not None else self.tasks
        given = dict(thresholds or {})
        for task in given:
            if not self.kind(task).thresholded:
                kinds = " and ".join(k.title for k in kinds_where(thresholded=True))
                raise GuardmergeError(f"thresholds apply to {kinds} heads; '{task}' is {self.problem(task)}")
        cuts = {t: label_thresholds(self.labels(t), self.spec(t).thresholds, given.get(t)) for t in chosen}
        tokens = (
            self.text_tokens(texts, max_length) if any(self.kind(t).per_token for t in chosen) else []
        )  # before the pass: a slow tokenizer is refused at once
        out: dict[str, list[Any]] = {}
        for task, logit in self.logits(texts, batch_size=batch_size, max_length=max_length, tasks=chosen).items():
            ctx = Answering(self.labels(task), cuts[task], texts, tokens, self.padding_side, aggregation)
            out[task] = self.kind(task).predict(logit, ctx)
        return out

    # -- persistence (models.folder) and export (models.stock_export) ----------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as saved: canonical encoder names, then ``heads.<task>.<layer>.*``, then
        ``branches.<task>.<canonical name>`` (a branched model)."""
        tensors = {k: v.detach() for k, v in self.encoder.state_dict().items()}
        for task in self.tasks:
            tensors.update(self.head(task).state(task))
        for task in self.branches:
            tensors.update({f"{BRANCH_PREFIX}{task}.{n}": v for n, v in self.branch(task).state().items()})
        return tensors

    def save_pretrained(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the model folder atomically (:func:`~guardmerge.models.folder.save_folder`)."""
        return save_folder(self, path, force=force)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu") -> MultiHeadModel:
        """Load a folder written by :meth:`save_pretrained` or ``guardmerge merge``
        (:func:`~guardmerge.models.folder.load_folder`)."""
        return load_folder(cls, path, device=device)

    @classmethod
    def from_classifier(
        cls,
        path: str | Path | Checkpoint,
        task: str | None = None,
        *,
        allow_pickle: bool = False,
        fill: Mapping[str, torch.Tensor] | None = None,
    ) -> MultiHeadModel:
        """A stock classifier folder (or hub id, or open checkpoint) as a one-head model
        (:func:`~guardmerge.models.folder.model_from_classifier`)."""
        return model_from_classifier(cls, path, task, allow_pickle=allow_pickle, fill=fill)

    def export_task(self, task: str, path: str | Path, *, force: bool = False) -> Path:
        """Write ``task`` as a stock transformers folder (:func:`~guardmerge.models.stock_export.export_task`)."""
        return export_task(self, task, path, force=force)


def _feats(hidden: torch.Tensor, pooled: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What heads read: ``{"cls": [B, d], "tokens": [B, T, d]}`` from ``hidden`` ``[B, T, d]``,
    ``"pooled"`` where the encoder pools, and ``"mean"`` (the masked mean over tokens) when
    ``mask`` ``[B, T]`` is given."""
    feats = {"cls": hidden[:, 0], "tokens": hidden}
    if pooled is not None:
        feats["pooled"] = pooled
    if mask is not None:  # as ModernBERT's classifier_pooling "mean" computes it
        feats["mean"] = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    return feats


def load_any(path: str | Path, task: str | None = None) -> MultiHeadModel:
    """A merged folder as is, or a stock classifier folder as a one-head model."""
    from guardmerge.io.checkpoint import resolve

    if "guardmerge" in read_config(resolve(path)):  # checked: a JSON object, no code hints
        return MultiHeadModel.from_pretrained(resolve(path))
    return MultiHeadModel.from_classifier(path, task)
