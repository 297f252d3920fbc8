"""Sparsification of task vectors over column chunks: magnitude trim (TIES), random drop (DARE),
breadcrumbs window.

The readable whole-tensor versions are :func:`~guardmerge.methods.reference.trim`,
:func:`~guardmerge.methods.reference.dare` and :func:`~guardmerge.methods.reference.breadcrumbs_mask`.
Here every step acts on one tensor's task vectors ``[N, *shape]``, each expert (row) separately,
through ``Chunk*`` callables that take the tensor's column chunks
(:func:`~guardmerge.methods.fast.selection.column_chunks`) in order, so a method never holds
more than a few chunk-sized temporaries.

- Magnitude trim (Yadav et al. 2023, "TIES-Merging"): keep the ``k = floor(density * n)``
  entries of largest ``|tau_i|`` per expert, zero the rest. Exactly ``k`` are kept; ties are
  broken by the lower flat index (see :class:`~guardmerge.methods.fast.selection.TopKCut`).
- DARE (Yu et al. 2024, "Language Models are Super Mario"): drop each entry with probability
  ``p = 1 - density``, rescale the survivors by ``1 / (1 - p)``.
- Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs"): drop the largest ``gamma``
  fraction and the smallest entries, so that the ``density`` fraction remains (the kept
  window of ranks is ``[n_top, n_top + n_keep)`` in the same total order as the trim).

The ``n`` these counts use is the tensor's size (``scope: per_tensor``) or the model's
(``scope: global``, where the cuts come from a streamed prepare pass).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from guardmerge.methods.fast import kernels
from guardmerge.methods.fast.kernels import CutSpec, KeepSpec
from guardmerge.methods.fast.selection import (
    TopKCut,
    as_rows,
    column_chunks,
    floor_fraction,
    tie_cutoffs,
    topk_cut,
)
from guardmerge.methods.params import RescaleBy

ChunkFn = Callable[[int, torch.Tensor], torch.Tensor]
"""``(start column, chunk [N, w]) -> sparsified chunk``; chunks must come in column order."""


def kept_count(n: int, density: float) -> int:
    """``floor(density * n)`` entries kept out of ``n`` (exact decimal arithmetic)."""
    return floor_fraction(n, density)


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """``(n_top, n_top + n_keep)``: the window of descending ranks breadcrumbs keeps.

    ``n_keep = floor(density * n)``; ``n_top = floor(gamma * n)``, reduced where needed so that
    ``n_top + n_keep <= n`` (``density`` wins over ``gamma``, as in mergekit).
    """
    n_keep = kept_count(n, density)
    n_top = min(floor_fraction(n, gamma), n - n_keep)
    return n_top, n_top + n_keep


# ----------------------------------------------------------------------- magnitude cuts


def magnitude_cut(deltas: torch.Tensor, density: float) -> TopKCut:
    """Per-tensor cut of ``|deltas|`` ``[N, *shape]`` keeping ``floor(density * n)`` per expert."""
    rows = as_rows(deltas)
    return topk_cut(rows, kept_count(rows.shape[1], density), absolute=True)


def breadcrumbs_cuts(deltas: torch.Tensor, density: float, gamma: float) -> tuple[TopKCut, TopKCut]:
    """Per-tensor ``(outer, inner)`` cuts of breadcrumbs (see :func:`breadcrumbs_counts`)."""
    rows = as_rows(deltas)
    n_top, n_upto = breadcrumbs_counts(rows.shape[1], density, gamma)
    return topk_cut(rows, n_top, absolute=True), topk_cut(rows, n_upto, absolute=True)


class ChunkTrim:
    """Magnitude trim of one tensor's chunks against ``cut`` (ties: earliest first)."""

    def __init__(self, cut: TopKCut, name: str = "") -> None:
        self.cut, self.name = cut, name
        self._masker = cut.masker(name)

    def __call__(self, start: int, chunk: torch.Tensor) -> torch.Tensor:
        return chunk * self._masker(chunk.abs())

    def fused_spec(self, rows: torch.Tensor) -> CutSpec:
        """The whole trim of ``rows`` ``[N, d]`` as the fused kernel takes it (see :mod:`.kernels`)."""
        return CutSpec(self.cut.threshold, tie_cutoffs(rows, self.cut.threshold, self.cut.quota_for(self.name)))


def chunk_trim(cut: TopKCut, name: str = "") -> ChunkTrim:
    """Magnitude trim of one tensor's chunks against ``cut`` (ties: earliest first)."""
    return ChunkTrim(cut, name)


def chunk_window(outer: TopKCut, inner: TopKCut, name: str = "") -> ChunkFn:
    """Breadcrumbs window of one tensor's chunks: kept by ``inner``, not by ``outer``."""
    keep, drop = inner.masker(name), outer.masker(name)

    def fn(start: int, chunk: torch.Tensor) -> torch.Tensor:
        a = chunk.abs()
        return chunk * (keep(a) & ~drop(a))

    return fn


def apply_chunks(deltas: torch.Tensor, fn: ChunkFn) -> torch.Tensor:
    """Run ``fn`` over the column chunks of ``deltas`` ``[N, *shape]``; same shape back."""
    rows = deltas.reshape(deltas.shape[0], -1)
    parts = [fn(start, chunk) for start, chunk in column_chunks(rows)]
    return torch.cat(parts, 1).view(deltas.shape) if parts else deltas.clone()


# ------------------------------------------------------------------------------------ DARE

_L1_EPS = 1e-7
_PARALLEL_DRAW = 1 << 18  # values per expert from which the experts' draws run in parallel
_L1_BLOCK = 1 << 20  # columns per partial sum of the L1 rescale


def expert_generators(generator: torch.Generator, n: int) -> list[torch.Generator]:
    """One CPU generator per expert, seeded from ``generator`` (order-independent draws)."""
    seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def dare_keep(generators: list[torch.Generator], start: int, width: int, density: float) -> torch.Tensor:
    """Bool ``[N, width]``: entries ``start:start + width`` kept, each with prob. ``density``.

    Expert i's uniforms come from ``generators[i]`` in column order, so chunks must be asked in
    order (``start`` names the columns; the draw does not depend on the chunk width). Wide
    draws run on one thread per expert (each generator is serial; the draws are the same).
    """

    def draw(g: torch.Generator) -> torch.Tensor:
        fast = kernels.draw_keep(g, width, density) if kernels.enabled() else None  # the same draws
        return torch.rand(width, generator=g, dtype=torch.float32) < density if fast is None else fast

    if len(generators) > 1 and width >= _PARALLEL_DRAW:
        with ThreadPoolExecutor(max_workers=len(generators), thread_name_prefix="guardmerge-dare") as pool:
            return torch.stack(list(pool.map(draw, generators)))
    return torch.stack([draw(g) for g in generators])


class ChunkDare:
    """DARE over one tensor's column chunks: drop with ``p = 1 - density``, then rescale.

    ``rescale_by="density"``: survivors times ``1 / density = 1 / (1 - p)`` (the DARE paper;
    unbiased). ``rescale_by="l1"``: per expert, times ``||tau_i||_1 / ||dropped_i||_1`` so the
    tensor keeps its L1 norm, untouched when either norm is below 1e-7 (mergekit 0.1.5's DARE
    rescale; the whole tensor's keep mask, ``[N, *shape]`` bools, is drawn up front for it). The
    draws depend on ``generator``'s state and the tensor's shape only.
    """

    def __init__(
        self,
        deltas: torch.Tensor,
        density: float,
        generator: torch.Generator,
        rescale: bool = True,
        rescale_by: RescaleBy = "density",
    ) -> None:
        n = deltas.shape[0]
        self.density = density
        self._gens = expert_generators(generator, n)
        self._keep: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None
        if not rescale or density >= 1.0:
            return
        if rescale_by == "density":
            self.factor = torch.full((n,), 1.0 / density, dtype=torch.float64)
        elif rescale_by == "l1":
            self.factor = self._l1_factor(deltas.reshape(n, -1))
        else:
            raise ValueError(f"unknown DARE rescale '{rescale_by}'")

    def _whole_keep(self, width: int) -> torch.Tensor:
        """The whole tensor's keep mask ``[N, width]``, drawn once; chunks then slice it."""
        if self._keep is None:
            self._keep = dare_keep(self._gens, 0, width, self.density)
        return self._keep

    def _l1_factor(self, rows: torch.Tensor) -> torch.Tensor:
        keep = self._whole_keep(rows.shape[1])
        if kernels.usable(rows):
            before, after = kernels.l1_norms(rows, keep, _L1_BLOCK)
        else:
            before = torch.zeros(rows.shape[0], dtype=torch.float64)
            after = torch.zeros_like(before)
            for start in range(0, rows.shape[1], _L1_BLOCK):  # fixed blocks: sums independent of the chunking
                a = rows[:, start : start + _L1_BLOCK].abs()
                before += a.sum(1, dtype=torch.float64)  # float64 sums per block, added in order
                after += (a * keep[:, start : start + _L1_BLOCK]).sum(1, dtype=torch.float64)
        ok = (before >= _L1_EPS) & (after >= _L1_EPS)
        return torch.where(ok, before / torch.where(ok, after, 1.0), 1.0)

    def fused_spec(self, rows: torch.Tensor) -> KeepSpec | None:
        """The whole drop of ``rows`` ``[N, d]`` as the fused kernel takes it (``None``: keep
        all). Draws the whole mask now; chunks asked afterwards reuse it."""
        if self.density >= 1.0:
            return None
        return KeepSpec(self._whole_keep(rows.shape[1]), None if self.factor is None else self.factor.to(rows.dtype))

    def __call__(self, start: int, chunk: torch.Tensor) -> torch.Tensor:
        if self.density >= 1.0:
            return chunk
        if self._keep is not None:
            keep = self._keep[:, start : start + chunk.shape[1]]
        else:
            keep = dare_keep(self._gens, start, chunk.shape[1], self.density)
        out = chunk * keep.to(chunk.device)
        if self.factor is not None:
            out.mul_(self.factor.to(chunk.dtype).unsqueeze(1))
        return out
