"""The sparsify-then-aggregate family: TIES, DARE, DARE-TIES, Model Breadcrumbs.

Each method is a composition of one sparsification step (:mod:`.sparsify`) and one aggregation
step: task arithmetic (``scaling * sum_i w_i s_i``, :func:`.basic.weighted_sum`) or the TIES
consensus (:mod:`.consensus`: sign election on ``w_i s_i``, then disjoint mean or sum).

========================  =====================  ===================  ===============
method                    sparsify               aggregate            scope
========================  =====================  ===================  ===============
``ties``                  magnitude trim         TIES consensus       global (default)
``dare_linear``           DARE random drop       task arithmetic      per tensor
``dare_ties``             DARE random drop       TIES consensus       per tensor
``breadcrumbs``           breadcrumbs window     task arithmetic      per_tensor (default)
``breadcrumbs_ties``      breadcrumbs window     TIES consensus       per_tensor (default)
========================  =====================  ===================  ===============

Per-expert ``weights`` multiply the *sparsified* task vectors, before the election (mergekit's
convention); the magnitude ranking itself is on the unweighted ``|tau_i|``.

``scope: global`` ranks each expert's entries over the whole model: the ``prepare`` hook
streams the model (two exact histogram passes, see :mod:`.selection`, plus one pass to split
threshold ties across tensors when needed) and, for the TIES consensus, one more pass for the
per-expert total mass of the sparsified vectors (the election's zero-sum fallback). Its result
reaches every merge call as ``ctx.globals``.

Every merge call walks its tensor in column chunks (:func:`merge_columns`): sparsify, then
aggregate, chunk by chunk, so a 30k x 768 embedding never needs more than a few 16 MB
temporaries. With numba installed, a trim or DARE drop followed by the TIES consensus runs as
one fused pass instead (:mod:`.kernels`, bit-identical to the chunked torch code). DARE draws
each expert's mask from its own generator, seeded from ``ctx.generator(seed)``: the draw depends
on (seed, tensor name, expert position, shape) only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field

from guardmerge.methods import kernels
from guardmerge.methods.basic import weighted_sum
from guardmerge.methods.consensus import ChunkConsensus, Consensus
from guardmerge.methods.registry import (
    METHODS,
    MethodParams,
    StreamFactory,
    TensorContext,
    searchable,
)
from guardmerge.methods.selection import (
    EmptyStreamError,
    TopKCut,
    ValueStream,
    column_chunks,
    stream_topk_cuts,
)
from guardmerge.methods.sparsify import (
    ChunkDare,
    ChunkFn,
    RescaleBy,
    apply_chunks,
    breadcrumbs_counts,
    breadcrumbs_cuts,
    chunk_trim,
    chunk_window,
    kept_count,
    magnitude_cut,
)

Scope = Literal["global", "per_tensor"]

_DENSITY = "fraction of each expert's entries kept, in (0, 1]"
_SCALING = "lambda, the coefficient on the merged task vector"
_CONSENSUS = (
    "disjoint aggregation of the entries whose sign agrees with the elected sign: "
    "'mean' (TIES paper) or 'sum' (mergekit's normalize: false)"
)
_SCOPE = (
    "where entries are ranked: 'global' over each expert's whole flattened task vector "
    "(the paper's choice, needs a streamed prepare pass) or 'per_tensor' (mergekit's choice)"
)
_SEED = "DARE's seed; the draw depends on (seed, tensor name) only. Default: the run seed"


# ------------------------------------------------------------------------------- parameters


class TiesParams(MethodParams):
    density: float = Field(
        0.2, gt=0, le=1, description=_DENSITY + " (largest |tau_i|)", json_schema_extra=searchable(0.05, 1.0)
    )
    scaling: float = Field(1.0, description=_SCALING, json_schema_extra=searchable(0.5, 2.5))
    scope: Scope = Field("global", description=_SCOPE)
    consensus: Consensus = Field("mean", description=_CONSENSUS)


class DareLinearParams(MethodParams):
    density: float = Field(
        0.5,
        gt=0,
        le=1,
        description=_DENSITY + " (drop probability 1 - density)",
        json_schema_extra=searchable(0.1, 1.0),
    )
    scaling: float = Field(
        0.3, description=_SCALING + " (task arithmetic's default)", json_schema_extra=searchable(0.1, 1.5)
    )
    rescale: bool = Field(True, description="rescale the survivors (see rescale_by)")
    rescale_by: RescaleBy = Field(
        "density",
        description="'density': times 1 / density (DARE paper); 'l1': keep each expert's "
        "per-tensor L1 norm (mergekit 0.1.5's rescale)",
    )
    seed: int | None = Field(None, description=_SEED, json_schema_extra=searchable(0, 9999, integer=True))


class DareTiesParams(DareLinearParams):
    scaling: float = Field(1.0, description=_SCALING + " (TIES' default)", json_schema_extra=searchable(0.5, 2.5))
    consensus: Consensus = Field("mean", description=_CONSENSUS)


class BreadcrumbsParams(MethodParams):
    density: float = Field(
        0.2,
        gt=0,
        le=1,
        description=_DENSITY + " after dropping the top gamma and the smallest",
        json_schema_extra=searchable(0.05, 1.0),
    )
    gamma: float = Field(
        0.01, ge=0, lt=1, description="fraction of largest |tau_i| dropped", json_schema_extra=searchable(0.0, 0.1)
    )
    scaling: float = Field(
        0.3, description=_SCALING + " (task arithmetic's default)", json_schema_extra=searchable(0.1, 1.5)
    )
    scope: Scope = Field("per_tensor", description=_SCOPE)


class BreadcrumbsTiesParams(BreadcrumbsParams):
    scaling: float = Field(1.0, description=_SCALING + " (TIES' default)", json_schema_extra=searchable(0.5, 2.5))
    consensus: Consensus = Field("mean", description=_CONSENSUS)


# ------------------------------------------------------------------------- composed steps

Aggregator = Callable[[int, torch.Tensor], torch.Tensor]


def merge_columns(deltas: torch.Tensor, sparsify: ChunkFn, aggregate: Aggregator, scaling: float) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: sparsify then aggregate each column chunk, in order.

    ``aggregate`` may have a ``finish(flat)`` step (the consensus' zero-sum patch).
    """
    rows = deltas.reshape(deltas.shape[0], -1)
    fused = _fused_merge(rows, sparsify, aggregate, scaling)
    if fused is not None:
        return fused.view(deltas.shape[1:])
    out = torch.empty(rows.shape[1], dtype=deltas.dtype)
    for start, chunk in column_chunks(rows):
        out[start : start + chunk.shape[1]] = aggregate(start, sparsify(start, chunk))
    finish = getattr(aggregate, "finish", None)
    if finish is not None:
        out = finish(out)
    return (out * scaling).view(deltas.shape[1:])


def _fused_merge(rows: torch.Tensor, sparsify: ChunkFn, aggregate: Aggregator, scaling: float) -> torch.Tensor | None:
    """:func:`merge_columns` in one pass (:mod:`.kernels`) for a sparsify step that describes
    itself (``fused_spec``: trim, DARE) followed by the TIES consensus, on float32; ``None``
    where the reference must run (no numba, or another step).

    Per-tensor scope: columns summing to exactly 0 take the sign of the tensor's mass, known at
    the end; the kernel assumes +1 and, if the mass turns out negative, runs again with -1
    (only those columns change). Both sum the mass in float64 (in different orders): their
    signs can differ only for a mass within float64 rounding of 0.
    """
    spec = getattr(sparsify, "fused_spec", None)
    if spec is None or not isinstance(aggregate, ChunkConsensus) or not kernels.usable(rows):
        return None
    sparse, agg = spec(rows), aggregate.fused_spec()
    out, zero_sums, mass = kernels.consensus(rows, sparse, agg, scaling)
    if zero_sums and aggregate.own_mass and mass < 0:
        out, _, _ = kernels.consensus(rows, sparse, dataclasses.replace(agg, fallback=-1.0), scaling)
    return out


def linear(weights: torch.Tensor) -> Aggregator:
    """Task arithmetic on a chunk: ``sum_i w_i s_i``."""
    return lambda start, sparse: weighted_sum(sparse, weights)


def consensus(weights: torch.Tensor, mode: Consensus, scope: Scope | None, ctx: TensorContext) -> ChunkConsensus:
    """TIES election + disjoint aggregation; the zero-sum fallback is the scope's mass."""
    return ChunkConsensus(weights, mode, global_mass(weights, ctx) if scope == "global" else None)


def global_mass(weights: torch.Tensor, ctx: TensorContext) -> torch.Tensor | None:
    """``sum_i w_i mass_i`` from the prepare pass, or ``None`` (use the tensor's own)."""
    mass = ctx.globals.get("mass")
    if mass is None or mass.numel() == 0:
        return None
    return (weights.to(torch.float64) * mass.to(torch.float64)).sum()


def trimmer(deltas: torch.Tensor, params: TiesParams, ctx: TensorContext) -> ChunkFn:
    """Magnitude trim, per tensor or against the global cut in ``ctx.globals``."""
    if params.scope == "global":
        cut = TopKCut.from_globals(ctx.globals, "trim")
    else:
        cut = magnitude_cut(deltas, params.density)
    return chunk_trim(cut, ctx.name)


def crumbler(deltas: torch.Tensor, params: BreadcrumbsParams, ctx: TensorContext) -> ChunkFn:
    """Breadcrumbs window, per tensor or against the global cuts in ``ctx.globals``."""
    if params.scope == "global":
        outer = TopKCut.from_globals(ctx.globals, "outer")
        inner = TopKCut.from_globals(ctx.globals, "inner")
    else:
        outer, inner = breadcrumbs_cuts(deltas, params.density, params.gamma)
    return chunk_window(outer, inner, ctx.name)


def dropper(deltas: torch.Tensor, params: DareLinearParams, ctx: TensorContext) -> ChunkFn:
    """DARE with this tensor's generator ``ctx.generator(seed)``."""
    gen = ctx.generator(params.seed)
    return ChunkDare(deltas, params.density, gen, params.rescale, params.rescale_by)


def drop(deltas: torch.Tensor, params: DareLinearParams, ctx: TensorContext) -> torch.Tensor:
    """DARE on the whole tensor ``[N, *shape]`` (the same draws as :func:`dropper`).

    The sparsify step of ``dare_regmean`` / ``dare_fisher``.
    """
    return apply_chunks(deltas, dropper(deltas, params, ctx))


# ----------------------------------------------------------------------- global prepare


def expert_mass(stream: StreamFactory, sparsify_for: Callable[[str], ChunkFn]) -> torch.Tensor:
    """``[N]`` float64 ``sum_p s_i[p]`` of the sparsified task vectors over the stream (1 pass)."""
    mass: torch.Tensor | None = None
    for ctx, deltas in stream():
        fn = sparsify_for(ctx.name)
        rows = deltas.reshape(deltas.shape[0], -1)
        for start, chunk in column_chunks(rows):
            part = fn(start, chunk).sum(1, dtype=torch.float64)
            mass = part if mass is None else mass + part
    return torch.zeros(0, dtype=torch.float64) if mass is None else mass


def _global_cuts(
    stream: StreamFactory, prefixes: Sequence[str], ks_for: Callable[[int], Sequence[int]]
) -> dict[str, torch.Tensor]:
    values: ValueStream = lambda: ((ctx.name, deltas) for ctx, deltas in stream())  # noqa: E731
    cuts = stream_topk_cuts(values, ks_for, absolute=True)
    out: dict[str, torch.Tensor] = {}
    for prefix, cut in zip(prefixes, cuts, strict=True):
        out.update(cut.to_globals(prefix))
    return out


def prepare_ties(params: TiesParams, stream: StreamFactory) -> dict[str, torch.Tensor]:
    """Global trim threshold per expert, and the per-expert mass of the trimmed vectors."""
    if params.scope != "global":
        return {}
    try:
        out = _global_cuts(stream, ["trim"], lambda n: [kept_count(n, params.density)])
    except EmptyStreamError:
        return {}
    cut = TopKCut.from_globals(out, "trim")
    out["mass"] = expert_mass(stream, lambda name: chunk_trim(cut, name))
    return out


def _breadcrumbs_globals(params: BreadcrumbsParams, stream: StreamFactory, with_mass: bool) -> dict[str, torch.Tensor]:
    if params.scope != "global":
        return {}
    try:
        out = _global_cuts(
            stream,
            ["outer", "inner"],
            lambda n: list(breadcrumbs_counts(n, params.density, params.gamma)),
        )
    except EmptyStreamError:
        return {}
    if with_mass:
        outer = TopKCut.from_globals(out, "outer")
        inner = TopKCut.from_globals(out, "inner")
        out["mass"] = expert_mass(stream, lambda name: chunk_window(outer, inner, name))
    return out


def prepare_breadcrumbs(params: BreadcrumbsParams, stream: StreamFactory) -> dict[str, torch.Tensor]:
    """Global outer (top ``n_top``) and inner (top ``n_top + n_keep``) cuts per expert."""
    return _breadcrumbs_globals(params, stream, with_mass=False)


def prepare_breadcrumbs_ties(params: BreadcrumbsTiesParams, stream: StreamFactory) -> dict[str, torch.Tensor]:
    """As :func:`prepare_breadcrumbs`, plus the per-expert mass for the election fallback."""
    return _breadcrumbs_globals(params, stream, with_mass=True)


# --------------------------------------------------------------------------- the methods


@METHODS.method(
    "ties",
    TiesParams,
    "TIES: trim each task vector to its largest |tau|, elect signs, disjoint mean; theta_0 + scaling * tau_m.",
    prepare=prepare_ties,
    reference="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models",
)
def ties(deltas: torch.Tensor, weights: torch.Tensor, params: TiesParams, ctx: TensorContext) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: ``scaling * consensus(trim(tau))``."""
    agg = consensus(weights, params.consensus, params.scope, ctx)
    return merge_columns(deltas, trimmer(deltas, params, ctx), agg, params.scaling)


@METHODS.method(
    "dare_linear",
    DareLinearParams,
    "DARE + task arithmetic: random drop (p = 1 - density) with rescale, then theta_0 + scaling * sum_i w_i tau_i.",
    reference="Yu et al. 2024, Language Models are Super Mario (DARE)",
)
def dare_linear(
    deltas: torch.Tensor, weights: torch.Tensor, params: DareLinearParams, ctx: TensorContext
) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: ``scaling * sum_i w_i dare(tau_i)``."""
    return merge_columns(deltas, dropper(deltas, params, ctx), linear(weights), params.scaling)


@METHODS.method(
    "dare_ties",
    DareTiesParams,
    "DARE-TIES: DARE's random drop replaces TIES' trim, then sign election and disjoint merge "
    "(the mergekit flavour; its default normalize: false is consensus: sum).",
    reference="Yu et al. 2024 (DARE) with Yadav et al. 2023 (TIES); as in mergekit",
)
def dare_ties(deltas: torch.Tensor, weights: torch.Tensor, params: DareTiesParams, ctx: TensorContext) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: ``scaling * consensus(dare(tau))``."""
    agg = consensus(weights, params.consensus, None, ctx)
    return merge_columns(deltas, dropper(deltas, params, ctx), agg, params.scaling)


@METHODS.method(
    "breadcrumbs",
    BreadcrumbsParams,
    "Model Breadcrumbs: drop the largest gamma and the smallest entries (density remains), then task arithmetic.",
    prepare=prepare_breadcrumbs,
    reference="Davari & Belilovsky 2023, Model Breadcrumbs",
)
def breadcrumbs(
    deltas: torch.Tensor, weights: torch.Tensor, params: BreadcrumbsParams, ctx: TensorContext
) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: ``scaling * sum_i w_i crumbs(tau_i)``."""
    return merge_columns(deltas, crumbler(deltas, params, ctx), linear(weights), params.scaling)


@METHODS.method(
    "breadcrumbs_ties",
    BreadcrumbsTiesParams,
    "Model Breadcrumbs mask, then TIES sign election and disjoint merge.",
    prepare=prepare_breadcrumbs_ties,
    reference="Davari & Belilovsky 2023, Model Breadcrumbs; TIES consensus as in mergekit",
)
def breadcrumbs_ties(
    deltas: torch.Tensor, weights: torch.Tensor, params: BreadcrumbsTiesParams, ctx: TensorContext
) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: ``scaling * consensus(crumbs(tau))``."""
    agg = consensus(weights, params.consensus, params.scope, ctx)
    return merge_columns(deltas, crumbler(deltas, params, ctx), agg, params.scaling)
