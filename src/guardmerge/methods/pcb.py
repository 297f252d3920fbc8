"""PCB-merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging").

Per expert i over its flattened task vector (the scope: the whole model for ``scope: global``,
the default as in the paper, or each tensor for ``scope: per_tensor``), with N experts:

1. clamp outliers: ``a_i = clip(|tau_i|, q_lo, q_hi)`` at the ``clip`` / ``1 - clip``
   quantiles of ``|tau_i|`` (default 1% / 99%); ``tau'_i = sign(tau_i) * a_i`` is what is merged;
2. intra-balancing: ``s_i = exp(N * MinMax(a_i)^2)``, computed as ``exp(N * (MinMax^2 - 1))``
   (the max subtracted: no overflow; the constant cancels in step 4's min-max);
3. inter-balancing, ``inter: tanh`` (default, the authors' code): ``c_i = tanh(tau_i * sum_j
   tau_j)``; ``inter: softmax`` (the paper's formula): ``c_i = sum_j softmax(Norm(tau_i *
   tau_j))`` with Norm the min-max normalisation and the softmax over the scope;
4. ``beta_i = s_i * c_i``; entries at or below the ``1 - density`` quantile ``b_lo`` of
   ``beta_i`` get weight 0, the others ``w_i = (beta_i - b_lo) / (max beta_i - b_lo)``;
5. ``tau_m = sum_i e_i w_i tau'_i / max(sum_i w_i, 1e-12)``, returned times ``scaling``.
   ``e_i`` are the config's per-expert weights (default 1, the paper): they act as PCB+ES's
   per-expert coefficients ``lambda_i``.

The readable whole-tensor version is :func:`.reference.pcb`.

Quantiles follow the authors' ``sort``-based convention (see :mod:`.fast.selection`): the
``q``-quantile of d values is ``sorted[floor(d * q)]``, the upper clip ``sorted[floor(d * (1 - q))
- 1]``. Guards: a MinMax over a constant set is 0; ``max beta == b_lo`` gives every weight 0
(the reference code divides 0 by 0 there); so constant or zero task vectors merge to 0, never NaN.

Global scope makes four exact streaming passes in ``prepare``: two for the clip quantiles of
``|tau_i|`` (the softmax variant's pairwise min/max and normalisers ride along), two for the
quantile and max of ``beta_i`` (``beta`` is computable column by column once the clip bounds are
known). ``beta`` is computed by the same function on the same column chunks in ``prepare`` and
in the merge call, so the kept set is exactly the one the quantile counted. The per-tensor scope
makes the same four passes over the one tensor, then merges it (chunk by chunk: temporaries
stay small even for the word embeddings).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from guardmerge.methods import params as shared
from guardmerge.methods.fast.selection import (
    RadixSelector,
    as_rows,
    check_finite,
    column_chunks,
    exact_fraction,
    quantile_rank,
    upper_clip_rank,
)
from guardmerge.methods.params import Scope
from guardmerge.methods.registry import METHODS, MethodParams, MethodSpec, StreamFactory, TensorContext

Inter = Literal["tanh", "softmax"]
_EPS = 1e-12


class PcbParams(MethodParams):
    density: float = shared.density(
        0.1, description="r, fraction of each expert's balanced scores kept", search=(0.02, 0.5)
    )
    scaling: float = shared.scaling(1.0, search=(0.5, 2.5))
    scope: Scope = shared.scope(
        "global",
        description="quantiles over each expert's whole task vector ('global', the paper) "
        "or within each tensor ('per_tensor')",
    )
    inter: Inter = Field(
        "tanh",
        description="inter-balancing: 'tanh' (authors' code) or 'softmax' (paper's formula)",
    )
    clip: float = Field(0.01, ge=0, lt=0.5, description="outlier clamp of |tau_i| at the clip / 1-clip quantiles")


# ------------------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class PairNorms:
    """The softmax variant's per-pair constants over the scope, each ``[N, N]``.

    ``lo``/``hi``: min and max of ``tau_i * tau_j``; ``logz``: log of the softmax normaliser
    ``sum_p exp(Norm(tau_i * tau_j)[p])`` (float64).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    logz: torch.Tensor


@dataclass(frozen=True)
class PcbStats:
    """Scope-wide constants of PCB, per expert ``[N]`` (see the module doc)."""

    clip_lo: torch.Tensor
    clip_hi: torch.Tensor
    beta_lo: torch.Tensor
    beta_max: torch.Tensor
    pairs: PairNorms | None = None

    def to_globals(self) -> dict[str, torch.Tensor]:
        out = {
            "clip_lo": self.clip_lo,
            "clip_hi": self.clip_hi,
            "beta_lo": self.beta_lo,
            "beta_max": self.beta_max,
        }
        if self.pairs is not None:
            out.update(pair_lo=self.pairs.lo, pair_hi=self.pairs.hi, pair_logz=self.pairs.logz)
        return out

    @staticmethod
    def from_globals(g: Mapping[str, torch.Tensor], softmax: bool) -> PcbStats:
        try:
            pairs = PairNorms(g["pair_lo"], g["pair_hi"], g["pair_logz"]) if softmax else None
            return PcbStats(g["clip_lo"], g["clip_hi"], g["beta_lo"], g["beta_max"], pairs)
        except KeyError as exc:
            raise ValueError(
                f"PCB global value {exc} is missing: the prepare hook must run before a global-scope merge"
            ) from None


def clip_ranks(d: int, clip: float) -> list[int]:
    """1-based ranks of the lower and upper clip of ``d`` values (upper never below lower)."""
    lo = quantile_rank(d, clip)
    return [lo, max(upper_clip_rank(d, clip), lo)]


def beta_rank(d: int, density: float) -> int:
    """1-based rank of the ``1 - density`` quantile of ``d`` scores."""
    return quantile_rank(d, 1 - exact_fraction(density))


def _minmax(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``(x - lo) / (hi - lo)``, broadcast; 0 where ``hi == lo``."""
    span = hi - lo
    ok = span > 0
    return torch.where(ok, (x - lo) / torch.where(ok, span, torch.ones_like(span)), 0.0)


def clipped(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``tau' = sign(tau) * clip(|tau|, lo, hi)``: ``[N, d]``, bounds ``[N]``."""
    a = torch.clamp(rows.abs(), lo.unsqueeze(1), hi.unsqueeze(1))
    return torch.sign(rows) * a


def intra_balance(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``s_i = exp(N * (MinMax(a_i)^2 - 1))`` in ``(0, 1]``: ``[N, d]``."""
    a = torch.clamp(rows.abs(), lo.unsqueeze(1), hi.unsqueeze(1))
    m = _minmax(a, lo.unsqueeze(1), hi.unsqueeze(1))
    return torch.exp(rows.shape[0] * (m * m - 1.0))


def inter_tanh(rows: torch.Tensor) -> torch.Tensor:
    """``c_i = tanh(tau_i * sum_j tau_j)``: ``[N, d]``."""
    return torch.tanh(rows * rows.sum(0, keepdim=True))


def pair_minmax(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, N]`` min and max over this chunk of ``tau_i * tau_j``."""
    n = rows.shape[0]
    lo = torch.empty(n, n)
    hi = torch.empty(n, n)
    for j in range(n):
        prod = rows * rows[j]
        lo[:, j] = prod.min(1).values
        hi[:, j] = prod.max(1).values
    return lo, hi


def pair_sumexp(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` float64 ``sum_p exp(Norm(tau_i * tau_j)[p])`` over this chunk."""
    n = rows.shape[0]
    out = torch.empty(n, n, dtype=torch.float64)
    for j in range(n):
        norm = _minmax(rows * rows[j], lo[:, j : j + 1], hi[:, j : j + 1])
        out[:, j] = torch.exp(norm).sum(1, dtype=torch.float64)
    return out


def inter_softmax(rows: torch.Tensor, pairs: PairNorms) -> torch.Tensor:
    """``c_i = sum_j exp(Norm(tau_i * tau_j) - log Z_ij)``: ``[N, d]`` (the paper's form)."""
    c = torch.zeros_like(rows)
    logz = pairs.logz.to(rows.dtype)
    for j in range(rows.shape[0]):
        norm = _minmax(rows * rows[j], pairs.lo[:, j : j + 1], pairs.hi[:, j : j + 1])
        c += torch.exp(norm - logz[:, j : j + 1])
    return c


def balance(
    rows: torch.Tensor,
    clip_lo: torch.Tensor,
    clip_hi: torch.Tensor,
    inter: Inter,
    pairs: PairNorms | None = None,
) -> torch.Tensor:
    """``beta_i = s_i * c_i``: ``[N, d]`` float32 task vectors -> ``[N, d]`` scores."""
    if inter == "softmax":
        if pairs is None:
            raise ValueError("the softmax inter-balancing needs its pairwise constants")
        c = inter_softmax(rows, pairs)
    else:
        c = inter_tanh(rows)
    return intra_balance(rows, clip_lo, clip_hi) * c


def score_weights(beta: torch.Tensor, lo: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``w_i`` in [0, 1]: 0 at or below ``lo`` ``[N]``, else ``(beta - lo) / (top - lo)``."""
    w = _minmax(beta, lo.unsqueeze(1), top.unsqueeze(1)).clamp(0.0, 1.0)
    return torch.where(beta > lo.unsqueeze(1), w, 0.0)


def aggregate(clipped_rows: torch.Tensor, w: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
    """``sum_i e_i w_i tau'_i / max(sum_i w_i, 1e-12)``: ``[N, d]`` -> ``[d]``."""
    e = expert_weights.to(clipped_rows.dtype).unsqueeze(1)
    return (e * w * clipped_rows).sum(0) / w.sum(0).clamp_min(_EPS)


# ------------------------------------------------------------------ computing the statistics


def _chunks(stream: StreamFactory) -> Iterator[tuple[str, torch.Tensor]]:
    """``(tensor name, column chunk [N, w])`` over the stream, as the merge call walks them."""
    for ctx, deltas in stream():
        for _, chunk in column_chunks(as_rows(deltas)):
            yield ctx.name, chunk


def stream_stats(params: PcbParams, stream: StreamFactory) -> PcbStats | None:
    """PCB's scope-wide constants, in four exact passes over ``stream``; None if it is empty.

    The global scope streams the model; the per-tensor scope a one-tensor stream.
    """
    softmax = params.inter == "softmax"
    clip_sel: RadixSelector | None = None
    lo = hi = None
    for _, chunk in _chunks(stream):  # pass 1: |tau| histogram, pairwise min/max
        clip_sel = clip_sel or RadixSelector(chunk.shape[0])
        clip_sel.observe(chunk, absolute=True)
        if softmax:
            plo, phi = pair_minmax(chunk)
            lo = plo if lo is None else torch.minimum(lo, plo)
            hi = phi if hi is None else torch.maximum(hi, phi)
    if clip_sel is None or clip_sel.total == 0:
        return None
    if clip_sel.has_non_finite():
        for ctx, deltas in stream():
            check_finite(as_rows(deltas), ctx.name)
    d, n = clip_sel.total, clip_sel.n_rows
    clip_sel.start_second_pass(clip_ranks(d, params.clip))
    sumexp = torch.zeros(n, n, dtype=torch.float64)
    for _, chunk in _chunks(stream):  # pass 2: exact clip bounds, softmax normalisers
        clip_sel.observe(chunk, absolute=True)
        if softmax:
            sumexp += pair_sumexp(chunk, lo, hi)  # type: ignore[arg-type]
    bounds = clip_sel.result().values
    pairs = PairNorms(lo, hi, torch.log(sumexp)) if softmax else None  # type: ignore[arg-type]

    def betas() -> Iterator[torch.Tensor]:
        for _, chunk in _chunks(stream):
            yield balance(chunk, bounds[:, 0], bounds[:, 1], params.inter, pairs)

    beta_sel = RadixSelector(n)
    beta_max = torch.full((n,), -float("inf"))
    for beta in betas():  # pass 3: score histogram and max
        beta_sel.observe(beta)
        beta_max = torch.maximum(beta_max, beta.max(1).values)
    beta_sel.start_second_pass([beta_rank(d, params.density)])
    for beta in betas():  # pass 4: exact score quantile
        beta_sel.observe(beta)
    beta_lo = beta_sel.result().values[:, 0]
    return PcbStats(bounds[:, 0], bounds[:, 1], beta_lo, beta_max, pairs)


def prepare_pcb(params: PcbParams, stream: StreamFactory) -> dict[str, torch.Tensor]:
    """Global scope: the clip bounds and score quantile/max per expert (four passes)."""
    if params.scope != "global":
        return {}
    stats = stream_stats(params, stream)
    return {} if stats is None else stats.to_globals()


# ------------------------------------------------------------------------------- the method


def pcb(deltas: torch.Tensor, weights: torch.Tensor, params: PcbParams, ctx: TensorContext) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: ``scaling * tau_m`` (see the module doc).

    Walks the tensor in column chunks (the same chunks the statistics were computed on).
    """
    stats: PcbStats | None
    if params.scope == "global":
        stats = PcbStats.from_globals(ctx.globals, params.inter == "softmax")
    else:
        stats = stream_stats(params, lambda: iter([(ctx, deltas)]))
    rows = as_rows(deltas)
    out = torch.zeros(rows.shape[1], dtype=torch.float32)
    if stats is None:
        return out.view(deltas.shape[1:]).to(deltas.dtype)
    for start, chunk in column_chunks(rows):
        beta = balance(chunk, stats.clip_lo, stats.clip_hi, params.inter, stats.pairs)
        w = score_weights(beta, stats.beta_lo, stats.beta_max)
        merged = aggregate(clipped(chunk, stats.clip_lo, stats.clip_hi), w, weights)
        out[start : start + chunk.shape[1]] = merged
    return (params.scaling * out).view(deltas.shape[1:]).to(deltas.dtype)


METHODS.register(
    MethodSpec(
        name="pcb",
        fn=pcb,
        params=PcbParams,
        summary="PCB-merging: clip outliers, weight entries by intra- and inter-task balance, keep the top "
        "density fraction of scores per expert, weighted mean; theta_0 + scaling * tau_m.",
        needs=frozenset(),
        prepare=prepare_pcb,
        reference="Du et al. 2024, Parameter Competition Balancing for Model Merging (PCB-merging)",
    )
)
