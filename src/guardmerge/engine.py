"""The merge engine: maps a registered method over a checkpoint, tensor by tensor.

For each encoder tensor it reads the base and every expert lazily, forms the task vectors
``[N, *shape]``, calls the method's pure function, adds ``theta_0`` back (in float64) and moves
on, so memory holds one tensor per expert at a time plus the output. Heads stay per task
(``heads: multi``) or are merged as zero-padded concatenated layers (``heads: hm3``, HM3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from guardmerge.checkpoint import Checkpoint
from guardmerge.compat import ExpertRef, MergePlan, plan_merge
from guardmerge.config import MergeConfig
from guardmerge.errors import StatisticsError
from guardmerge.stats.io import ExpertStats, stack_for_tensor
from guardmerge.io import atomic_dir
from guardmerge.methods import METHODS, MethodParams, MethodSpec, Role, TensorContext
from guardmerge.modelcard import model_card
from guardmerge.multihead import (
    HEAD_PREFIX,
    HeadSpec,
    MultiHeadModel,
    build_encoder,
    folder_config,
    head_from_tensors,
    load_tokenizer,
    write_model_folder,
)

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """A merged model held as tensors, ready to save or to turn into a module.

    Attributes:
        tensors: canonical encoder tensors and ``heads.<task>.<layer>.*`` head tensors.
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
        heads = {t: head_from_tensors(t, s, self.tensors) for t, s in self.heads.items()}
        enc_state = {k: v for k, v in self.tensors.items() if not k.startswith(HEAD_PREFIX)}
        encoder = build_encoder(self.config, any(k.startswith("pooler.") for k in enc_state))
        encoder.load_state_dict(enc_state, strict=False)
        if tokenizer is None and self.tokenizer_dir is not None:
            tokenizer = load_tokenizer(self.tokenizer_dir)
        return MultiHeadModel(encoder, heads, self.config, info=self.info, tokenizer=tokenizer)


def _open_all(config: MergeConfig, stack: ExitStack, progress: bool = False) -> tuple[Checkpoint, list[ExpertRef]]:
    base = stack.enter_context(Checkpoint(config.base_model, allow_pickle=config.allow_pickle))
    experts = []
    for ex in tqdm(config.experts, desc="open experts", unit="expert", disable=not progress or len(config.experts) < 8):
        ck = stack.enter_context(Checkpoint(ex.model, allow_pickle=config.allow_pickle))
        experts.append(ExpertRef(task=ex.task, weight=ex.weight, checkpoint=ck))
    return base, experts


class _TensorSource:
    """Reads ``theta_0`` and the task vectors of one tensor, and builds its context."""

    def __init__(
        self,
        base: Checkpoint,
        experts: Sequence[ExpertRef],
        plan: MergePlan,
        seed: int,
        compute_dtype: torch.dtype,
        stats: Sequence[ExpertStats] | None = None,
        needs: frozenset[str] = frozenset(),
        sparsify: Callable[[torch.Tensor, TensorContext], torch.Tensor] | None = None,
    ) -> None:
        self.base, self.experts, self.plan = base, experts, plan
        self.seed, self.dtype = seed, compute_dtype
        self.stats, self.needs = stats, needs
        self.sparsify = sparsify

    def context(self, name: str, ndim: int, globals_: dict[str, torch.Tensor] | None = None) -> TensorContext:
        return TensorContext(
            name=name,
            role=self.plan.adapter.role(name, ndim),
            stats=stack_for_tensor(self.stats, name, self.needs) if self.stats else {},
            globals=globals_ or {},
            seed=self.seed,
        )

    def encoder_tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta_0, deltas [N, *shape])`` of an encoder tensor (sparsified if the method says)."""
        t0 = self.base.get(name, self.dtype)
        deltas = torch.empty((len(self.experts), *t0.shape), dtype=self.dtype)
        for i, ex in enumerate(self.experts):  # filled row by row: no list of N copies beside it
            torch.sub(ex.checkpoint.get(name, self.dtype), t0, out=deltas[i])
        if self.sparsify is not None:
            deltas = self.sparsify(deltas, self.context(name, t0.dim()))
        return t0, deltas

    def hm3_head(self, tname: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded concatenated head tensor: ``(zeros [sum C, ...], deltas [N, sum C, ...])``."""
        blocks = [ex.checkpoint.get(tname, self.dtype) for ex in self.experts]
        total = sum(b.shape[0] for b in blocks)
        deltas = torch.zeros((len(blocks), total, *blocks[0].shape[1:]), dtype=self.dtype)
        row = 0
        for i, b in enumerate(blocks):
            deltas[i, row : row + b.shape[0]] = b
            row += b.shape[0]
        return torch.zeros(deltas.shape[1:], dtype=self.dtype), deltas

    def stream(self, include_heads: bool) -> Iterator[tuple[TensorContext, torch.Tensor]]:
        """Every tensor in the merge scope, one at a time: what ``prepare`` hooks read."""
        for name in self.plan.merge_names:
            _, deltas = self.encoder_tensor(name)
            yield self.context(name, deltas.dim() - 1), deltas
        if include_heads:
            for tname in self.plan.head_tensor_names():
                _, deltas = self.hm3_head(tname)
                yield TensorContext(name=tname, role=Role.HEAD, seed=self.seed), deltas


def merge(
    config: MergeConfig,
    *,
    progress: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    stats: Sequence[ExpertStats] | None = None,
) -> MergeResult:
    """Merge the experts of ``config`` into a :class:`MergeResult` (held in memory).

    Args:
        stats: per-expert statistics in config order, for methods that need them.

    Raises:
        CheckpointError, CompatibilityError, ConfigError, StatisticsError: before any merging.
    """
    spec: MethodSpec[Any] = METHODS.get(config.method)
    params: MethodParams = config.method_params()
    with ExitStack() as stack:
        base, experts = _open_all(config, stack, progress)
        plan = plan_merge(base, experts, config.heads)
        if spec.needs and (stats is None or len(stats) != len(experts)):
            raise StatisticsError(
                f"method '{spec.name}' needs {', '.join(sorted(spec.needs))} statistics for every "
                "expert: give each expert `stats: FILE` (guardmerge stats) or `data: FILE`"
            )
        src = _TensorSource(base, experts, plan, config.seed, compute_dtype, stats, spec.needs, _bound_sparsify(spec, params))
        weights = torch.tensor([ex.weight for ex in experts], dtype=compute_dtype)
        hm3 = config.heads == "hm3"
        globals_: dict[str, torch.Tensor] = {}
        if spec.prepare is not None:
            log.info("%s: whole-model pre-pass", spec.name)
            globals_ = spec.prepare(params, lambda: src.stream(include_heads=hm3))
        out: dict[str, torch.Tensor] = {}
        for name in tqdm(plan.merge_names, desc=f"merge ({spec.name})", unit="tensor", disable=not progress):
            t0, deltas = src.encoder_tensor(name)
            ctx = src.context(name, t0.dim(), globals_)
            merged = spec.fn(deltas, weights, params, ctx)
            out[name] = _add_delta(t0, merged, base.dtype(name))
        for name in plan.copy_names:
            out[name] = base.get(name)
        out.update(_heads(src, spec, params, weights, globals_, hm3))
        first = experts[0].checkpoint
        enc_config = {k: v for k, v in first.config.items() if k not in _HEAD_CONFIG_KEYS}
        heads = {
            ex.task: HeadSpec(
                labels=plan.labels[ex.task],
                layers=plan.head_layers,
                input=plan.head_input,
                activation=plan.adapter.head_activation,
            )
            for ex in experts
        }
        tok_dir = next(
            (c.path for c in [base] + [e.checkpoint for e in experts] if c.has_tokenizer()), None
        )
        info = {
            "base_model": config.base_model,
            "experts": [{"task": e.task, "model": e.model, "weight": e.weight} for e in config.experts],
            "method": config.method,
            "parameters": params.model_dump(),
            "heads_mode": config.heads,
        }
        return MergeResult(tensors=out, config=enc_config, heads=heads, info=info, tokenizer_dir=tok_dir)


def _add_delta(t0: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``theta_0 + delta`` cast to ``dtype``, rounded once.

    For float32 operands a float32 sum is already correctly rounded (what a float64 sum cast
    back gives), so no float64 copies of a large tensor are made; other dtypes sum in float64.
    """
    if t0.dtype == delta.dtype == dtype == torch.float32:
        return delta.add_(t0) if delta.is_contiguous() and delta.shape == t0.shape else t0 + delta
    return (t0.double() + delta.double()).to(dtype)


def _bound_sparsify(
    spec: MethodSpec[Any], params: MethodParams
) -> Callable[[torch.Tensor, TensorContext], torch.Tensor] | None:
    if spec.sparsify is None:
        return None
    fn = spec.sparsify
    return lambda deltas, ctx: fn(deltas, params, ctx)


def sparsified_experts(config: MergeConfig) -> list[dict[str, torch.Tensor]]:
    """Every expert's encoder as the method merges it: ``theta_0 + sparsify(tau_i)`` per tensor.

    For methods with a ``sparsify`` step (``dare_regmean``...), whose statistics must be computed
    on these sparsified experts. Canonical names, float32; one state dict per expert.
    """
    spec = METHODS.get(config.method)
    params = config.method_params()
    with ExitStack() as stack:
        base, experts = _open_all(config, stack)
        plan = plan_merge(base, experts, config.heads)
        src = _TensorSource(base, experts, plan, config.seed, torch.float32, sparsify=_bound_sparsify(spec, params))
        states: list[dict[str, torch.Tensor]] = [{} for _ in experts]
        for name in plan.merge_names:
            t0, deltas = src.encoder_tensor(name)
            for i in range(len(experts)):
                states[i][name] = t0 + deltas[i]
        return states


_HEAD_CONFIG_KEYS = ("id2label", "label2id", "num_labels", "problem_type", "architectures", "finetuning_task", "_name_or_path")


def _heads(
    src: _TensorSource,
    spec: MethodSpec[Any],
    params: MethodParams,
    weights: torch.Tensor,
    globals_: dict[str, torch.Tensor],
    hm3: bool,
) -> dict[str, torch.Tensor]:
    """Head tensors under ``heads.<task>.<layer>.*``: copied per task, or merged HM3-style."""
    out: dict[str, torch.Tensor] = {}
    for tname in src.plan.head_tensor_names():
        if not hm3:
            for ex in src.experts:
                out[f"{HEAD_PREFIX}{ex.task}.{tname}"] = ex.checkpoint.get(tname)
            continue
        zeros, deltas = src.hm3_head(tname)
        ctx = TensorContext(name=tname, role=Role.HEAD, globals=globals_, seed=src.seed)
        merged = (zeros.double() + spec.fn(deltas, weights, params, ctx).double()).float()
        row = 0
        for ex in src.experts:
            rows = ex.checkpoint.shape(tname)[0]
            out[f"{HEAD_PREFIX}{ex.task}.{tname}"] = merged[row : row + rows].clone()
            row += rows
    return out


def write_result(
    result: MergeResult,
    out: str | Path,
    config: MergeConfig,
    *,
    force: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
) -> None:
    """Write a :class:`MergeResult` as a model folder, atomically (``extra_files``: name ->
    bytes written beside the model, e.g. a search summary)."""
    from guardmerge import __version__

    model_cfg = folder_config(result.config, result.heads, result.info)
    tokenizer = load_tokenizer(result.tokenizer_dir) if result.tokenizer_dir else None
    with atomic_dir(out, force=force) as tmp:
        write_model_folder(tmp, result.tensors, model_cfg, tokenizer)
        (tmp / "merge_config.yaml").write_text(config.dump())
        (tmp / "README.md").write_text(model_card(result, config, __version__))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

