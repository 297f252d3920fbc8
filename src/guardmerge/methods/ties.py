"""The sparsify x consensus family: task arithmetic, TIES, DARE, DARE-TIES, Model Breadcrumbs.

Every method here is one row of :data:`FAMILY` (as in mergekit's registry): a sparsify step
applied to each expert's task vector ``tau_i``, then an aggregation of the sparsified ``s_i``,
times ``scaling``. :mod:`.reference` states each row on whole tensors.

====================  =========================  ========  ===========================  ==========
method                parameters                 sparsify  consensus                    scope
====================  =========================  ========  ===========================  ==========
``task_arithmetic``   ``TaskArithmeticParams``   none      LINEAR: ``sum_i w_i s_i``    -
``ties``              ``TiesParams``             TRIM      ELECT: disjoint mean or sum  global
``dare_linear``       ``DareLinearParams``       DARE      LINEAR                       per tensor
``dare_ties``         ``DareTiesParams``         DARE      ELECT                        per tensor
``breadcrumbs``       ``BreadcrumbsParams``      CRUMBS    LINEAR                       per_tensor
``breadcrumbs_ties``  ``BreadcrumbsTiesParams``  CRUMBS    ELECT                        per_tensor
====================  =========================  ========  ===========================  ==========

(scope: the default where the method has a ``scope`` parameter.) ``TRIM`` keeps each expert's
largest ``|tau_i|``, ``DARE`` drops at random and rescales, ``CRUMBS`` drops the largest and the
smallest; ``ELECT`` is TIES' sign election on ``w_i s_i`` followed by the disjoint mean or sum
(``consensus``). Per-expert ``weights`` multiply the *sparsified* task vectors, before the
election (mergekit's convention); the magnitude ranking itself is on the unweighted ``|tau_i|``.

``scope: global`` ranks each expert's entries over the whole model: the row's ``prepare`` hook
streams the model (two exact histogram passes, see :mod:`.fast.selection`, plus one pass to split
threshold ties across tensors when needed) and, for ``ELECT``, one more pass for the per-expert
total mass of the sparsified vectors (the election's zero-sum fallback). Its result reaches every
merge call as ``ctx.globals``.

Every merge call walks its tensor in column chunks (:func:`merge_columns`): sparsify, then
aggregate, chunk by chunk, so a 30k x 768 embedding never needs more than a few 16 MB
temporaries. With numba installed, a trim or DARE drop followed by ``ELECT`` runs as one fused
pass instead (:mod:`.fast.kernels`, bit-identical to the chunked torch code). DARE draws each
expert's mask from its own generator, seeded from ``ctx.generator(seed)``: the draw depends on
(seed, tensor name, expert position, shape) only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from guardmerge.methods import params as shared
from guardmerge.methods.basic import weighted_sum
from guardmerge.methods.fast import kernels
from guardmerge.methods.fast.consensus import ChunkConsensus
from guardmerge.methods.fast.selection import EmptyStreamError, TopKCut, ValueStream, column_chunks, stream_topk_cuts
from guardmerge.methods.fast.sparsify import (
    ChunkDare,
    ChunkFn,
    apply_chunks,
    breadcrumbs_counts,
    breadcrumbs_cuts,
    chunk_trim,
    chunk_window,
    kept_count,
    magnitude_cut,
)
from guardmerge.methods.params import Consensus, RescaleBy, Scope
from guardmerge.methods.registry import METHODS, MethodParams, MethodSpec, StreamFactory, TensorContext, searchable

_TA = " (task arithmetic's default)"
_TIES = " (TIES' default)"

# ------------------------------------------------------------------------------- parameters


class TaskArithmeticParams(MethodParams):
    scaling: float = shared.scaling(
        0.3, description="lambda, the coefficient on the summed task vectors", search=(0.1, 1.5)
    )


class TiesParams(MethodParams):
    density: float = shared.density(0.2, detail=" (largest |tau_i|)", search=(0.05, 1.0))
    scaling: float = shared.scaling(1.0, search=(0.5, 2.5))
    scope: Scope = shared.scope("global")
    consensus: Consensus = shared.consensus()


class DareLinearParams(MethodParams):
    density: float = shared.density(0.5, detail=" (drop probability 1 - density)", search=(0.1, 1.0))
    scaling: float = shared.scaling(0.3, detail=_TA, search=(0.1, 1.5))
    rescale: bool = Field(True, description="rescale the survivors (see rescale_by)")
    rescale_by: RescaleBy = Field(
        "density",
        description="'density': times 1 / density (DARE paper); 'l1': keep each expert's "
        "per-tensor L1 norm (mergekit 0.1.5's rescale)",
    )
    seed: int | None = Field(
        None,
        description="DARE's seed; the draw depends on (seed, tensor name) only. Default: the run seed",
        json_schema_extra=searchable(0, 9999, integer=True),
    )


class DareTiesParams(DareLinearParams):
    scaling: float = shared.scaling(1.0, detail=_TIES, search=(0.5, 2.5))
    consensus: Consensus = shared.consensus()


class BreadcrumbsParams(MethodParams):
    density: float = shared.density(0.2, detail=" after dropping the top gamma and the smallest", search=(0.05, 1.0))
    gamma: float = Field(
        0.01, ge=0, lt=1, description="fraction of largest |tau_i| dropped", json_schema_extra=searchable(0.0, 0.1)
    )
    scaling: float = shared.scaling(0.3, detail=_TA, search=(0.1, 1.5))
    scope: Scope = shared.scope("per_tensor")


class BreadcrumbsTiesParams(BreadcrumbsParams):
    scaling: float = shared.scaling(1.0, detail=_TIES, search=(0.5, 2.5))
    consensus: Consensus = shared.consensus()


# ------------------------------------------------------------------------- sparsify steps


@dataclass(frozen=True)
class Sparsify:
    """A sparsify step: the table's ``sparsify`` column.

    Attributes:
        name: what the docs call it.
        chunks: ``(deltas [N, *shape], params, ctx) -> ChunkFn``: the step on one tensor's column
            chunks; with ``scope: global``, against the cuts in ``ctx.globals``.
        cuts: ``(params, stream) -> globals``: the whole-model cuts of ``scope: global`` (raises
            :class:`EmptyStreamError` on an empty stream); ``None`` for a step without a scope.
        against: ``globals -> (tensor name -> ChunkFn)``: the step against those cuts.
    """

    name: str
    chunks: Callable[[torch.Tensor, Any, TensorContext], ChunkFn]
    cuts: Callable[[Any, StreamFactory], dict[str, torch.Tensor]] | None = None
    against: Callable[[Mapping[str, torch.Tensor]], Callable[[str], ChunkFn]] | None = None


def _global_cuts(
    stream: StreamFactory, prefixes: Sequence[str], ks_for: Callable[[int], Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Exactly-k cuts of every expert's ``|tau_i|`` over the stream, as ``ctx.globals`` entries."""
    values: ValueStream = lambda: ((ctx.name, deltas) for ctx, deltas in stream())  # noqa: E731
    cuts = stream_topk_cuts(values, ks_for, absolute=True)
    out: dict[str, torch.Tensor] = {}
    for prefix, cut in zip(prefixes, cuts, strict=True):
        out.update(cut.to_globals(prefix))
    return out


def _trim_cuts(params: TiesParams, stream: StreamFactory) -> dict[str, torch.Tensor]:
    """The cut keeping each expert's ``floor(density * n)`` largest ``|tau_i|`` over the model."""
    return _global_cuts(stream, ["trim"], lambda n: [kept_count(n, params.density)])


def _trim_against(cuts: Mapping[str, torch.Tensor]) -> Callable[[str], ChunkFn]:
    cut = TopKCut.from_globals(cuts, "trim")
    return lambda name: chunk_trim(cut, name)


def _trim(deltas: torch.Tensor, params: TiesParams, ctx: TensorContext) -> ChunkFn:
    """Magnitude trim, per tensor or against the global cut in ``ctx.globals``."""
    if params.scope == "global":
        return _trim_against(ctx.globals)(ctx.name)
    return chunk_trim(magnitude_cut(deltas, params.density), ctx.name)


def _crumbs_cuts(params: BreadcrumbsParams, stream: StreamFactory) -> dict[str, torch.Tensor]:
    """Global outer (top ``n_top``) and inner (top ``n_top + n_keep``) cuts per expert."""
    return _global_cuts(stream, ["outer", "inner"], lambda n: list(breadcrumbs_counts(n, params.density, params.gamma)))


def _crumbs_against(cuts: Mapping[str, torch.Tensor]) -> Callable[[str], ChunkFn]:
    outer, inner = TopKCut.from_globals(cuts, "outer"), TopKCut.from_globals(cuts, "inner")
    return lambda name: chunk_window(outer, inner, name)


def _crumbs(deltas: torch.Tensor, params: BreadcrumbsParams, ctx: TensorContext) -> ChunkFn:
    """Breadcrumbs window, per tensor or against the global cuts in ``ctx.globals``."""
    if params.scope == "global":
        return _crumbs_against(ctx.globals)(ctx.name)
    outer, inner = breadcrumbs_cuts(deltas, params.density, params.gamma)
    return chunk_window(outer, inner, ctx.name)


def _dare(deltas: torch.Tensor, params: DareLinearParams, ctx: TensorContext) -> ChunkFn:
    """DARE with this tensor's generator ``ctx.generator(seed)``."""
    return ChunkDare(deltas, params.density, ctx.generator(params.seed), params.rescale, params.rescale_by)


TRIM = Sparsify("magnitude trim", _trim, _trim_cuts, _trim_against)
DARE = Sparsify("DARE random drop", _dare)
CRUMBS = Sparsify("breadcrumbs window", _crumbs, _crumbs_cuts, _crumbs_against)


def drop(deltas: torch.Tensor, params: DareLinearParams, ctx: TensorContext) -> torch.Tensor:
    """DARE on the whole tensor ``[N, *shape]`` (the same draws as the ``DARE`` step).

    The sparsify step of ``dare_regmean`` / ``dare_fisher``.
    """
    return apply_chunks(deltas, _dare(deltas, params, ctx))


# ------------------------------------------------------------------------ consensus steps

Aggregator = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Aggregate:
    """An aggregation step: the table's ``consensus`` column.

    Attributes:
        name: what the docs call it.
        build: ``(weights [N], params, ctx) -> Aggregator`` over one tensor's column chunks.
        elects: TIES' sign election (whose zero-sum fallback needs the scope's mass).
    """

    name: str
    build: Callable[[torch.Tensor, Any, TensorContext], Aggregator]
    elects: bool


def global_mass(weights: torch.Tensor, ctx: TensorContext) -> torch.Tensor | None:
    """``sum_i w_i mass_i`` from the prepare pass, or ``None`` (use the tensor's own)."""
    mass = ctx.globals.get("mass")
    if mass is None or mass.numel() == 0:
        return None
    return (weights.to(torch.float64) * mass.to(torch.float64)).sum()


def _elect(weights: torch.Tensor, params: Any, ctx: TensorContext) -> ChunkConsensus:
    """TIES election + disjoint aggregation; the zero-sum fallback is the scope's mass."""
    scope = getattr(params, "scope", None)
    return ChunkConsensus(weights, params.consensus, global_mass(weights, ctx) if scope == "global" else None)


def _linear(weights: torch.Tensor, params: Any, ctx: TensorContext) -> Aggregator:
    """Task arithmetic on a chunk: ``sum_i w_i s_i``."""
    return lambda start, sparse: weighted_sum(sparse, weights)


LINEAR = Aggregate("none: sum_i w_i s_i", _linear, elects=False)
ELECT = Aggregate("sign election, disjoint mean or sum", _elect, elects=True)


def _keep_all(start: int, chunk: torch.Tensor) -> torch.Tensor:
    return chunk


# ------------------------------------------------------------------ composing one row's steps


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
    """:func:`merge_columns` in one pass (:mod:`.fast.kernels`) for a sparsify step that describes
    itself (``fused_spec``: trim, DARE) followed by the TIES consensus, on float32; ``None``
    where the chunked torch code must run (no numba, or another step).

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


@dataclass(frozen=True)
class Row:
    """One method of the family: its name, parameters, sparsify and consensus steps, summary."""

    name: str
    params: type[MethodParams]
    sparsify: Sparsify | None
    consensus: Aggregate
    summary: str
    reference: str

    def merge(self, deltas: torch.Tensor, weights: torch.Tensor, params: Any, ctx: TensorContext) -> torch.Tensor:
        """``[N, *shape]`` -> ``[*shape]``: ``scaling * consensus(sparsify(tau))``.

        With neither step (task arithmetic) there is nothing to walk chunk by chunk: one
        matrix-vector product, ``sum_i (scaling * w_i) tau_i``.
        """
        if self.sparsify is None and not self.consensus.elects:
            return weighted_sum(deltas, params.scaling * weights)
        sparsify = _keep_all if self.sparsify is None else self.sparsify.chunks(deltas, params, ctx)
        return merge_columns(deltas, sparsify, self.consensus.build(weights, params, ctx), params.scaling)

    def prepare(self, params: Any, stream: StreamFactory) -> dict[str, torch.Tensor]:
        """``scope: global``: the sparsify step's cuts per expert, and for ``ELECT`` the
        per-expert mass of the sparsified task vectors (nothing for ``per_tensor``)."""
        step = self.sparsify
        if step is None or step.cuts is None or step.against is None or params.scope != "global":
            return {}
        try:
            out = step.cuts(params, stream)
        except EmptyStreamError:
            return {}
        if self.consensus.elects:
            out["mass"] = expert_mass(stream, step.against(out))
        return out

    def spec(self) -> MethodSpec[Any]:
        """The registered method; a ``prepare`` hook only where the sparsify step has a scope."""
        scoped = self.sparsify is not None and self.sparsify.cuts is not None
        return MethodSpec(
            name=self.name,
            fn=self.merge,
            params=self.params,
            summary=self.summary,
            needs=frozenset(),
            prepare=self.prepare if scoped else None,
            reference=self.reference,
        )


_YU = "Yu et al. 2024"
_YADAV = "Yadav et al. 2023"
_DAVARI = "Davari & Belilovsky 2023, Model Breadcrumbs"

FAMILY: tuple[Row, ...] = (
    Row(
        "task_arithmetic",
        TaskArithmeticParams,
        None,
        LINEAR,
        "theta_0 + scaling * sum_i w_i tau_i.",
        "Ilharco et al. 2023, Editing models with task arithmetic",
    ),
    Row(
        "ties",
        TiesParams,
        TRIM,
        ELECT,
        "TIES: trim each task vector to its largest |tau|, elect signs, disjoint mean; theta_0 + scaling * tau_m.",
        f"{_YADAV}, TIES-Merging: Resolving Interference When Merging Models",
    ),
    Row(
        "dare_linear",
        DareLinearParams,
        DARE,
        LINEAR,
        "DARE + task arithmetic: random drop (p = 1 - density) with rescale, then theta_0 + scaling * sum_i w_i tau_i.",
        f"{_YU}, Language Models are Super Mario (DARE)",
    ),
    Row(
        "dare_ties",
        DareTiesParams,
        DARE,
        ELECT,
        "DARE-TIES: DARE's random drop replaces TIES' trim, then sign election and disjoint merge "
        "(the mergekit flavour; its default normalize: false is consensus: sum).",
        f"{_YU} (DARE) with {_YADAV} (TIES); as in mergekit",
    ),
    Row(
        "breadcrumbs",
        BreadcrumbsParams,
        CRUMBS,
        LINEAR,
        "Model Breadcrumbs: drop the largest gamma and the smallest entries (density remains), then task arithmetic.",
        _DAVARI,
    ),
    Row(
        "breadcrumbs_ties",
        BreadcrumbsTiesParams,
        CRUMBS,
        ELECT,
        "Model Breadcrumbs mask, then TIES sign election and disjoint merge.",
        f"{_DAVARI}; TIES consensus as in mergekit",
    ),
)
"""The family's table: one row per registered method."""

for _row in FAMILY:
    METHODS.register(_row.spec())
