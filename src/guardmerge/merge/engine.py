"""The merge engine: maps a registered method over a checkpoint, tensor by tensor.

For each encoder tensor it reads the base and every expert lazily (the next tensor on a
background thread, straight from the files into two alternating sets of reusable buffers),
forms the task vectors ``[N, *shape]``, calls the method's pure function, adds ``theta_0`` back
and hands the tensor on: to a dict (:func:`merge`) or straight to a sharded safetensors writer
(:func:`stream_to_folder`, which writes on its own thread), so memory holds about two tensors
per expert at a time, whatever the model size. Heads stay per task
(``heads: multi``) or are merged as zero-padded concatenated layers (``heads: hm3``, HM3). With
``share_layers: K`` each task also keeps its expert's blocks ``>= K`` and pooler, copied like
its head under ``branches.<task>.<canonical name>``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from guardmerge.errors import StatisticsError
from guardmerge.io.writer import TensorSlot
from guardmerge.merge.job import MergeJob
from guardmerge.merge.plan import MergePlan
from guardmerge.merge.result import MergeResult
from guardmerge.merge.write import finite_outputs, write_folder
from guardmerge.methods import MethodParams, MethodSpec, Role, TensorContext
from guardmerge.models.branches import BRANCH_PREFIX
from guardmerge.models.checkpoint import Checkpoint
from guardmerge.models.expert_meta import stored_thresholds
from guardmerge.models.head_kinds import DEFAULT_KIND
from guardmerge.models.heads import HEAD_PREFIX, HeadSpec, stock_head_tensors
from guardmerge.stats.files import ExpertStats, stack_for_tensor

log = logging.getLogger(__name__)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class _Buffers:
    """Named reusable buffers: ``take`` returns a view of the named buffer, grown when too
    small, so a merge allocates (and page-faults) its largest tensor's memory once rather than
    once per tensor. A tensor taken stays valid until the same name is taken again."""

    def __init__(self, reuse: bool = False) -> None:
        self.reuse = reuse
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if not self.reuse:
            return torch.empty(tuple(shape), dtype=dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[name] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes].view(dtype).view(tuple(shape))

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in one of these buffers."""
        ptr = tensor.untyped_storage().data_ptr()
        return any(ptr == b.untyped_storage().data_ptr() for b in self._bufs.values())


class _TensorSource:
    """Reads ``theta_0`` and the task vectors of one tensor from an open job, and builds its context."""

    def __init__(
        self,
        job: MergeJob,
        compute_dtype: torch.dtype,
        stats: Sequence[ExpertStats] | None = None,
        sparsify: Callable[[torch.Tensor, TensorContext], torch.Tensor] | None = None,
    ) -> None:
        self.base, self.plan = job.base_checkpoint, job.plan
        self.experts = [(e.task, job.checkpoint(e.task)) for e in job.experts]
        self.seed, self.dtype = job.config.seed, compute_dtype
        self.stats, self.needs = stats, job.statistics
        self.sparsify = sparsify

    def plan_shape(self, name: str) -> tuple[int, ...]:
        """A merged tensor's shape: the base's (every expert's agrees), or for a tensor the base
        lacks (``heads: shared`` on a headless base) the first expert's."""
        ck = self.experts[0][1] if name in self.plan.zero_base else self.base
        return tuple(ck.shape(name))

    def context(self, name: str, ndim: int, globals_: dict[str, torch.Tensor] | None = None) -> TensorContext:
        return TensorContext(
            name=name,
            role=self.plan.adapter.role(name, ndim),
            stats=stack_for_tensor(self.stats, name, self.needs) if self.stats else {},
            globals=globals_ or {},
            seed=self.seed,
        )

    def encoder_tensor(self, name: str, buffers: _Buffers | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta_0, deltas [N, *shape])`` of an encoder tensor (sparsified if the method says).

        With ``buffers``, both live in those reusable buffers (valid until the next call with
        the same buffers); otherwise they are fresh tensors.
        """
        shape = self.plan_shape(name)
        bufs = buffers or _Buffers()

        def raw(stored: torch.dtype) -> torch.Tensor:  # where a tensor stored in another dtype lands
            return bufs.take("raw", shape, stored)

        t0 = bufs.take("theta_0", shape, self.dtype)
        if name in self.plan.zero_base:  # heads: shared with a headless base: theta_0 = 0
            t0.zero_()
        else:
            self.base.read_into(name, t0, raw)
        deltas = bufs.take("deltas", (len(self.experts), *shape), self.dtype)
        for i, (task, ck) in enumerate(self.experts):  # each read straight into its row, then minus theta_0
            if self.plan.lacks(task, name):  # a token classifier's missing pooler: unchanged
                deltas[i].zero_()
                continue
            ck.read_into(name, deltas[i], raw).sub_(t0)
        if self.sparsify is not None:
            deltas = self.sparsify(deltas, self.context(name, t0.dim()))
        return t0, deltas

    def hm3_head(self, tname: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded concatenated head tensor: ``(zeros [sum C, ...], deltas [N, sum C, ...])``."""
        blocks = [ck.get(tname, self.dtype) for _, ck in self.experts]
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


class TensorMerge:
    """The tensor merge of an open job (:meth:`MergeJob.open`), output tensor by tensor::

        with job.open():
            merge = TensorMerge(job, stats=stats)
            for name, tensor in merge.tensors():   # in merge.layout() order
                ...

    What can fail on bad input (compatibility, statistics) has failed when the job opened or
    fails here, before any tensor is merged.
    """

    def __init__(
        self,
        job: MergeJob,
        *,
        progress: bool = True,
        compute_dtype: torch.dtype | None = None,
        stats: Sequence[ExpertStats] | None = None,
    ) -> None:
        self.job, self.config, self.progress, self.stats = job, job.config, progress, stats
        self.compute_dtype = compute_dtype or _DTYPES[self.config.dtype]
        self.out_dtype = _DTYPES[self.config.out_dtype] if self.config.out_dtype else None
        self.spec: MethodSpec[Any] = job.spec
        self.params: MethodParams = job.params
        self.base, self.plan = job.base_checkpoint, job.plan
        if self.spec.needs and (stats is None or len(stats) != len(job.experts)):
            raise StatisticsError(
                f"method '{self.spec.name}' needs {', '.join(sorted(self.spec.needs))} statistics for every "
                "expert: give each expert `stats: FILE` (guardmerge stats) or `data: FILE`"
            )
        self.src = _TensorSource(job, self.compute_dtype, stats, _bound_sparsify(self.spec, self.params))
        self.experts = self.src.experts
        self.weights = torch.tensor([e.weight for e in job.experts], dtype=self.compute_dtype)

    def _dtype(self, name: str) -> torch.dtype:
        if self.out_dtype:
            return self.out_dtype
        return self.experts[0][1].dtype(name) if name in self.plan.zero_base else self.base.dtype(name)

    def _out_name(self, name: str) -> str:
        """Output names: canonical for a multi-head folder, the checkpoint's own for heads: shared."""
        return self.plan.adapter.prefixed(name) if self.plan.shared else name

    def layout(self) -> list[TensorSlot]:
        """Every output tensor (name, dtype, shape) in the order :meth:`tensors` yields them."""
        slots = [TensorSlot(self._out_name(n), self._dtype(n), self.src.plan_shape(n)) for n in self.plan.merge_names]
        slots += [
            TensorSlot(self._out_name(n), self.base.dtype(n), tuple(self.base.shape(n))) for n in self.plan.copy_names
        ]
        for tname, (task, ck) in self._head_slots():
            stored = _stored_head_name(self.plan, task, tname)  # a missing bias: zeros, sized by its weight
            dtype = self.out_dtype or ck.dtype(stored)
            shape = tuple(ck.shape(stored)) if stored == tname else tuple(ck.shape(stored)[:1])
            slots.append(TensorSlot(f"{HEAD_PREFIX}{task}.{tname}", dtype, shape))
        for task, ck in self.experts:  # sharing depth: each task's own upper blocks (and pooler)
            for name in self._branch_names(task):
                dtype = self.out_dtype or ck.dtype(name)
                slots.append(TensorSlot(f"{BRANCH_PREFIX}{task}.{name}", dtype, tuple(ck.shape(name))))
        return slots

    def _branch_names(self, task: str) -> list[str]:
        """The branch tensors ``task``'s expert keeps (a token classifier's branch has no pooler)."""
        return [n for n in self.plan.branches.get(task, ()) if not self.plan.lacks(task, n)]

    def _head_slots(self) -> list[tuple[str, tuple[str, Checkpoint]]]:
        """``(head tensor, (task, checkpoint))`` in layout order: tensor by tensor, then expert by expert."""
        return [
            (tname, ex)
            for tname in self.plan.head_tensor_names()
            for ex in self.experts
            if tname in self.plan.head_tensor_names(ex[0])
        ]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Merge and yield every output tensor, in :meth:`layout` order.

        The next tensor's inputs are read on a background thread while the current one is
        merged (reading and merging overlap; at most two tensors' inputs are held).
        """
        spec, params, src = self.spec, self.params, self.src
        hm3 = self.config.heads == "hm3"
        globals_: dict[str, torch.Tensor] = {}
        if spec.prepare is not None:
            log.info("%s: whole-model pre-pass", spec.name)
            globals_ = spec.prepare(params, lambda: src.stream(include_heads=hm3))
        names = list(self.plan.merge_names)
        bar = tqdm(total=len(names), desc=f"merge ({spec.name})", unit="tensor", disable=not self.progress)
        # two sets of reusable input buffers: the reader fills one while the other is merged
        buffers = (_Buffers(reuse=True), _Buffers(reuse=True))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardmerge-read") as pool:
            pending = pool.submit(src.encoder_tensor, names[0], buffers[0]) if names else None
            for i, name in enumerate(names):
                assert pending is not None
                t0, deltas = pending.result()  # the other set is free: tensor i - 1 was handed on
                pending = (
                    pool.submit(src.encoder_tensor, names[i + 1], buffers[(i + 1) % 2]) if i + 1 < len(names) else None
                )
                merged = spec.fn(deltas, self.weights, params, src.context(name, t0.dim(), globals_))
                out = _add_delta(t0, merged, self._dtype(name))
                del deltas, merged
                if buffers[i % 2].owns(out):  # a method that answers in place: detach from the buffers
                    out = out.clone()
                yield self._out_name(name), out
                bar.update(1)
        bar.close()
        for name in self.plan.copy_names:
            yield self._out_name(name), self.base.get(name)
        heads = _heads(src, spec, params, self.weights, globals_, hm3)
        for tname, (task, _) in self._head_slots():  # layout order: layer by layer, then expert
            name = f"{HEAD_PREFIX}{task}.{tname}"
            yield name, heads[name] if self.out_dtype is None else heads[name].to(self.out_dtype)
        for task, ck in self.experts:  # layout order: expert by expert, then the checkpoint's order
            for name in self._branch_names(task):
                tensor = ck.get(name)
                yield f"{BRANCH_PREFIX}{task}.{name}", tensor if self.out_dtype is None else tensor.to(self.out_dtype)

    def result(self, tensors: dict[str, torch.Tensor]) -> MergeResult:
        """A :class:`MergeResult` around ``tensors`` (empty for a streamed write)."""
        first = self.experts[0][1]
        enc_config = (
            dict(first.config)
            if self.plan.shared
            else {k: v for k, v in first.config.items() if k not in _HEAD_CONFIG_KEYS}
        )
        stored = {task: stored_thresholds(ck.config, f"{ck.path}/config.json") for task, ck in self.experts}
        thresholds = {e.task: e.thresholds or stored.get(e.task) or None for e in self.config.experts}
        benign = {e.task: e.benign for e in self.config.experts}
        heads = {
            task: HeadSpec.from_layout(
                self.plan.labels[task],
                self.plan.heads[task],
                problem=self.plan.problems.get(task, DEFAULT_KIND),
                thresholds=thresholds.get(task),
                benign=benign.get(task),
            )
            for task, _ in self.experts
            if not self.plan.shared
        }
        tok_dir = next((c.path for c in [self.base] + [ck for _, ck in self.experts] if c.has_tokenizer()), None)
        info: dict[str, Any] = {
            "base_model": self.config.base_model,
            "experts": [{"task": e.task, "model": e.source, "weight": e.weight} for e in self.job.experts],
            "method": self.config.method,
            "parameters": self.params.model_dump(),
            "heads_mode": self.config.heads,
        }
        if self.plan.share_layers is not None:
            info["share_layers"] = self.plan.share_layers
            info["blocks_per_pass"] = self.plan.blocks_per_pass()
        return MergeResult(tensors=tensors, config=enc_config, heads=heads, info=info, tokenizer_dir=tok_dir)


def merge(
    job: MergeJob,
    *,
    progress: bool = True,
    compute_dtype: torch.dtype | None = None,
    stats: Sequence[ExpertStats] | None = None,
) -> MergeResult:
    """The tensor merge of ``job`` held in memory as a :class:`MergeResult` (no data stage).

    Args:
        compute_dtype: the dtype task vectors are merged in (default: the config's ``dtype``).
        stats: per-expert statistics in config order, for methods that need them.

    Raises:
        CheckpointError, CompatibilityError, ConfigError, StatisticsError: before any merging.
    """
    with job.open(progress):
        tensors = TensorMerge(job, progress=progress, compute_dtype=compute_dtype, stats=stats)
        return tensors.result(dict(finite_outputs(tensors.tensors(), job.config, "no model was returned")))


def stream_to_folder(
    job: MergeJob,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    stats: Sequence[ExpertStats] | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Merge straight to disk: each tensor is written the moment it is merged (never the whole
    model in memory), into shards of at most ``max_shard_bytes``; OUT appears atomically."""
    with job.open(progress):
        tensors = TensorMerge(job, progress=progress, stats=stats)
        write_folder(
            out,
            tensors.result({}),
            job.config,
            tensors.tensors(),
            tensors.layout(),
            force=force,
            max_shard_bytes=max_shard_bytes,
            input_abs_max=job.input_abs_max,
        )


def _add_delta(t0: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``theta_0 + delta`` cast to ``dtype``, rounded once.

    For float32 operands a float32 sum is already correctly rounded (what a float64 sum cast
    back gives), so no float64 copies of a large tensor are made; half-precision outputs sum in
    float32, float64 outputs in float64.
    """
    if t0.dtype == delta.dtype == dtype == torch.float32:
        return delta.add_(t0) if delta.is_contiguous() and delta.shape == t0.shape else t0 + delta
    if dtype in (torch.float16, torch.bfloat16):  # float32 carries far more than the output keeps
        if t0.dtype == delta.dtype == torch.float32 and delta.is_contiguous() and delta.shape == t0.shape:
            return delta.add_(t0).to(dtype)  # the same sum, without a float32 temporary
        return (t0.float() + delta.float()).to(dtype)
    return (t0.double() + delta.double()).to(dtype)


def _bound_sparsify(
    spec: MethodSpec[Any], params: MethodParams
) -> Callable[[torch.Tensor, TensorContext], torch.Tensor] | None:
    if spec.sparsify is None:
        return None
    fn = spec.sparsify
    return lambda deltas, ctx: fn(deltas, params, ctx)


def sparsified_experts(job: MergeJob) -> list[dict[str, torch.Tensor]]:
    """Every expert's encoder as the method merges it: ``theta_0 + sparsify(tau_i)`` per tensor.

    For methods with a ``sparsify`` step (``dare_regmean``...), whose statistics must be computed
    on these sparsified experts. Canonical names, float32; one state dict per expert.
    """
    with job.open():
        src = _TensorSource(job, torch.float32, sparsify=_bound_sparsify(job.spec, job.params))
        states: list[dict[str, torch.Tensor]] = [{} for _ in job.experts]
        for name in job.plan.merge_names:
            t0, deltas = src.encoder_tensor(name)
            for i in range(len(job.experts)):
                states[i][name] = t0 + deltas[i]
        return states


_HEAD_CONFIG_KEYS = (
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "architectures",
    "finetuning_task",
    "_name_or_path",
)


def _stored_head_name(plan: MergePlan, task: str, tname: str) -> str:
    """The expert tensor behind output head tensor ``tname``: itself, or for a bias the stock
    head lacks (stored as zeros), its weight."""
    if tname in plan.heads[task].tensor_names():
        return tname
    return tname.removesuffix(".bias") + ".weight"


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
    if not hm3:
        for task, ck in src.experts:  # heads: shared has no per-task heads (they are merged tensors)
            if task in src.plan.heads:
                out.update(stock_head_tensors(task, src.plan.heads[task], ck.get))
        return out
    for tname in src.plan.head_tensor_names():  # hm3: one layout for every expert (plan_merge)
        zeros, deltas = src.hm3_head(tname)
        ctx = TensorContext(name=tname, role=Role.HEAD, globals=globals_, seed=src.seed)
        merged = (zeros.double() + spec.fn(deltas, weights, params, ctx).double()).float()
        row = 0
        for task, ck in src.experts:
            rows = ck.shape(tname)[0]
            out[f"{HEAD_PREFIX}{task}.{tname}"] = merged[row : row + rows].clone()
            row += rows
    return out
