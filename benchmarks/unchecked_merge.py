"""Benchmark only: the ``guardmerge`` CLI with its NaN/Inf checks switched off.

    python benchmarks/unchecked_merge.py merge CONFIG OUT --force

benchmarks/merge_speed.py times this beside the real CLI to measure what the checks cost a merge
(issue 24: at most 5% of merge time). It replaces :func:`guardmerge.io.finite.all_finite` where
the merge path binds it (reads, the writer, the in-memory result, selection's fallback), in this
process only. guardmerge itself has no switch for this: a product never runs unchecked.
"""

from __future__ import annotations

import torch

from guardmerge.cli import main
from guardmerge.io import checkpoint, finite
from guardmerge.merge import write
from guardmerge.methods.fast import selection


def _unchecked(tensor: torch.Tensor) -> bool:
    return True


if __name__ == "__main__":
    for module in (finite, checkpoint, write, selection):
        module.all_finite = _unchecked  # type: ignore[attr-defined]
    main()
