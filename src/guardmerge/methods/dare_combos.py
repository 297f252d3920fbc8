"""DARE in front of the data-dependent mergers: ``dare_regmean`` and ``dare_fisher``.

DARE (Yu et al. 2024) drops each task-vector entry with probability ``1 - density`` and rescales
the survivors; any merger can follow. For data-dependent mergers the statistics must describe
the **sparsified** experts (docs/algorithms.md section 2), so these methods declare the drop as their
``sparsify`` step: the engine merges the dropped task vectors and the pipeline computes Grams or
Fishers on the same dropped experts (same seed, same mask).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from guardmerge.methods import fisher_merging, regmean
from guardmerge.methods.fisher_merging import FisherParams
from guardmerge.methods.registry import METHODS, MethodParams, MethodSpec
from guardmerge.methods.regmean import RegMeanParams
from guardmerge.methods.ties import DareLinearParams, drop


class DareRegMeanParams(RegMeanParams, DareLinearParams):
    """RegMean's parameters plus DARE's (``density``, ``seed``, ``rescale``, ``rescale_by``)."""


class DareFisherParams(FisherParams, DareLinearParams):
    """Fisher's parameters plus DARE's (``density``, ``seed``, ``rescale``, ``rescale_by``)."""


def dare_first(
    merger: MethodSpec[Any], params: type[MethodParams], needs: frozenset[str], does: str, paper: str
) -> MethodSpec[Any]:
    """``dare_<merger>``: the merger's function and pre-pass on the DARE-dropped experts, with
    :func:`.ties.drop` as the ``sparsify`` step and the statistics ``needs`` computed on them.

    ``does`` says in the summary what the merger does with them (``"RegMean on"``).
    """
    stats = " and ".join(f"{s.capitalize()}s" for s in sorted(needs))
    return dataclasses.replace(
        merger,
        name=f"dare_{merger.name}",
        params=params,
        summary=f"DARE drop, then {does} the sparsified experts ({stats} computed on them).",
        needs=needs,
        sparsify=drop,
        reference=f"Yu et al. 2024 (DARE) with {paper}",
    )


# the merger, its parameters plus DARE's, the statistics it needs, what it does, its paper
_ROWS = (
    (regmean.SPEC, DareRegMeanParams, frozenset({"gram"}), "RegMean on", "Jin et al. 2023 (RegMean)"),
    (
        fisher_merging.SPEC,
        DareFisherParams,
        frozenset({"fisher"}),
        "Fisher merging of",
        "Matena & Raffel 2022 (Fisher)",
    ),
)
for _row in _ROWS:
    METHODS.register(dare_first(*_row))
