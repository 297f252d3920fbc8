"""Benchmark only: the ``guardmerge`` CLI with its NaN/Inf checks switched off.

    python benchmarks/unchecked_merge.py merge CONFIG OUT --force

benchmarks/merge_speed.py times this beside the real CLI to measure what the checks cost a merge
(issue 24: at most 5% of merge time). In this process only, it replaces the one check where the
merge path binds it: :func:`guardmerge.io.finite.finite_abs_max` (reads and the writer) and
:func:`~guardmerge.io.finite.all_finite` (selection's fallback) pass every tensor unread, and the
writer's output probe (:func:`guardmerge.merge.write.probe_outputs`, which loads the merged model
when its weights leave the inputs' range) does nothing. guardmerge itself has no switch for this:
a product never runs unchecked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from guardmerge.cli import main
from guardmerge.io import checkpoint, finite
from guardmerge.merge import write
from guardmerge.methods.fast import selection


def _unchecked(tensor: torch.Tensor) -> bool:
    return True


def _no_range(tensor: torch.Tensor) -> float:
    return 0.0


def _no_probe(folder: Path, *, shared: bool, what: str) -> None:
    return None


if __name__ == "__main__":
    for module in (finite, selection):
        module.all_finite = _unchecked  # type: ignore[attr-defined]
    for module in (finite, checkpoint, write):
        module.finite_abs_max = _no_range  # type: ignore[attr-defined]
    write.probe_outputs = _no_probe
    main()
