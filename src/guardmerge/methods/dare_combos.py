"""DARE in front of the data-dependent mergers: ``dare_regmean`` and ``dare_fisher``.

DARE (Yu et al. 2024) drops each task-vector entry with probability ``1 - density`` and rescales
the survivors; any merger can follow. For data-dependent mergers the statistics must describe
the **sparsified** experts (ALGORITHMS.md section 2), so these methods declare the drop as their
``sparsify`` step: the engine merges the dropped task vectors and the pipeline computes Grams or
Fishers on the same dropped experts (same seed, same mask).
"""

from __future__ import annotations

from guardmerge.methods.fisher import FisherParams, fisher, fisher_norms
from guardmerge.methods.registry import METHODS
from guardmerge.methods.regmean import RegMeanParams, regmean
from guardmerge.methods.ties import DareLinearParams, drop


class DareRegMeanParams(RegMeanParams, DareLinearParams):
    """RegMean's parameters plus DARE's (``density``, ``seed``, ``rescale``, ``rescale_by``)."""


class DareFisherParams(FisherParams, DareLinearParams):
    """Fisher's parameters plus DARE's (``density``, ``seed``, ``rescale``, ``rescale_by``)."""


METHODS.register_like(
    "dare_regmean",
    regmean,
    DareRegMeanParams,
    "DARE drop, then RegMean on the sparsified experts (Grams computed on them).",
    sparsify=drop,
    reference="Yu et al. 2024 (DARE) with Jin et al. 2023 (RegMean)",
)
METHODS.register_like(
    "dare_fisher",
    fisher,
    DareFisherParams,
    "DARE drop, then Fisher merging of the sparsified experts (Fishers computed on them).",
    sparsify=drop,
    prepare=fisher_norms,
    reference="Yu et al. 2024 (DARE) with Matena & Raffel 2022 (Fisher)",
)
