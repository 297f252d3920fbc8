"""Sparsification of task vectors: magnitude trim (TIES), random drop (DARE), breadcrumbs.

Every function takes the task vectors of one tensor stacked over experts, ``[N, *shape]``, and
acts on each expert (row) separately.

- Magnitude trim (Yadav et al. 2023, "TIES-Merging"): keep the ``k = floor(density * n)``
  entries of largest ``|tau_i|`` per expert, zero the rest. Exactly ``k`` are kept; ties are
  broken by the lower flat index (see :class:`~guardmerge.methods.selection.TopKCut`).
- DARE (Yu et al. 2024, "Language Models are Super Mario"): drop each entry with probability
  ``p = 1 - density``, rescale the survivors by ``1 / (1 - p)``.
- Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs"): drop the largest ``gamma``
  fraction and the smallest entries, so that the ``density`` fraction remains (the kept
  window of ranks is ``[n_top, n_top + n_keep)`` in the same total order as the trim).

The ``n`` these counts use is the tensor's size (``scope: per_tensor``) or the model's
(``scope: global``, where the cuts come from a streamed prepare pass).
"""

from __future__ import annotations

from typing import Literal

import torch

from guardmerge.methods.selection import TopKCut, as_rows, floor_fraction, topk_cut, topk_mask


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


def magnitude_cut(deltas: torch.Tensor, density: float) -> TopKCut:
    """Per-tensor cut of ``|deltas|`` ``[N, *shape]`` keeping ``floor(density * n)`` per expert."""
    rows = as_rows(deltas).abs()
    return topk_cut(rows, kept_count(rows.shape[1], density))


def cut_mask(deltas: torch.Tensor, cut: TopKCut, name: str = "") -> torch.Tensor:
    """Bool ``[N, *shape]``: the entries of ``|deltas|`` that ``cut`` keeps."""
    rows = as_rows(deltas).abs()
    return topk_mask(rows, cut.threshold, cut.quota_for(name)).view(deltas.shape)


def window_mask(
    deltas: torch.Tensor, outer: TopKCut, inner: TopKCut, name: str = ""
) -> torch.Tensor:
    """Bool ``[N, *shape]``: kept by ``inner`` (top ``n_top + n_keep``), not by ``outer``."""
    return cut_mask(deltas, inner, name) & ~cut_mask(deltas, outer, name)


def breadcrumbs_cuts(deltas: torch.Tensor, density: float, gamma: float) -> tuple[TopKCut, TopKCut]:
    """Per-tensor ``(outer, inner)`` cuts of breadcrumbs (see :func:`breadcrumbs_counts`)."""
    rows = as_rows(deltas).abs()
    n_top, n_upto = breadcrumbs_counts(rows.shape[1], density, gamma)
    return topk_cut(rows, n_top), topk_cut(rows, n_upto)


def dare_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """Bool ``shape``: each entry kept with probability ``density``, drawn from ``generator``.

    One uniform draw per entry, row-major (expert i's draws follow expert i-1's), on the CPU.
    """
    return torch.rand(shape, generator=generator, dtype=torch.float32) < density


RescaleBy = Literal["density", "l1"]
_L1_EPS = 1e-7


def rescale_survivors(
    deltas: torch.Tensor, dropped: torch.Tensor, density: float, by: RescaleBy = "density"
) -> torch.Tensor:
    """Rescale DARE's survivors ``dropped`` ``[N, *shape]`` (``deltas`` before the drop).

    ``by="density"``: times ``1 / density = 1 / (1 - p)`` (the DARE paper; unbiased).
    ``by="l1"``: per expert, times ``||tau_i||_1 / ||dropped_i||_1`` so the tensor keeps its L1
    norm, left as is when either norm is below 1e-7 (mergekit 0.1.5's DARE rescale).
    """
    if by == "density":
        return dropped / density
    if by != "l1":
        raise ValueError(f"unknown DARE rescale '{by}'")
    n = deltas.shape[0]
    before = deltas.reshape(n, -1).abs().sum(1)
    after = dropped.reshape(n, -1).abs().sum(1)
    ok = (before >= _L1_EPS) & (after >= _L1_EPS)
    factor = torch.where(ok, before / torch.where(ok, after, torch.ones_like(after)), 1.0)
    return dropped * factor.reshape((n,) + (1,) * (deltas.dim() - 1)).to(dropped.dtype)


def dare(
    deltas: torch.Tensor,
    density: float,
    generator: torch.Generator,
    rescale: bool = True,
    rescale_by: RescaleBy = "density",
) -> torch.Tensor:
    """DARE on task vectors ``[N, *shape]``: random drop with ``p = 1 - density``.

    Survivors are rescaled (see :func:`rescale_survivors`) when ``rescale``. ``density = 1``
    returns ``deltas`` unchanged (no draw).
    """
    if density >= 1.0:
        return deltas
    keep = dare_mask(deltas.shape, density, generator).to(deltas.device)
    out = deltas * keep
    return rescale_survivors(deltas, out, density, rescale_by) if rescale else out
