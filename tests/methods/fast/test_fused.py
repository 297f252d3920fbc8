"""The compiled loops themselves (methods/fast/fused.py), called directly on numpy arrays and
checked against the whole-tensor reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guardmerge.methods import reference

pytest.importorskip("numba")
from guardmerge.methods.fast import fused

F32 = np.float32


def _consensus(rows: np.ndarray, weights: np.ndarray, kind: int, mean: bool, **sparse: np.ndarray) -> np.ndarray:
    """``fused.consensus`` over every column at once, scaling 1 and fallback +1."""
    n, d = rows.shape
    out = np.empty(d, F32)
    fused.consensus(
        rows,
        weights,
        kind,
        sparse.get("threshold", np.zeros(n, F32)),
        sparse.get("cutoff", np.zeros(n, np.int64)),
        sparse.get("keep", np.zeros((1, 1), np.uint8)),
        sparse.get("factor", np.ones(n, F32)),
        F32(1.0),
        mean,
        F32(1.0),
        out,
        0,
        d,
    )
    return out


@pytest.mark.parametrize("mean", [True, False])
def test_trim_then_consensus_equals_the_reference(mean: bool) -> None:
    g = torch.Generator().manual_seed(0)
    tau = torch.round(torch.randn(3, 1100, generator=g) * 16) / 16  # crosses the 512-column blocks, many ties
    w = torch.tensor([0.3, 0.5, 0.21])
    kept = reference.trim(tau, 0.3) != 0
    threshold = torch.where(kept, tau.abs(), torch.inf).amin(1)  # the smallest kept magnitude
    # ties at the threshold are kept before the first dropped one
    dropped_tie = (tau.abs() == threshold.unsqueeze(1)) & ~kept
    cutoff = torch.where(dropped_tie.any(1), dropped_tie.float().argmax(1), tau.shape[1])
    got = _consensus(
        tau.numpy(), w.numpy(), fused.TRIM, mean, threshold=threshold.numpy(), cutoff=cutoff.numpy().astype(np.int64)
    )
    mode = "mean" if mean else "sum"
    want = reference.ties_consensus(reference.trim(tau, 0.3), w, mode, mass=1.0)
    assert torch.equal(torch.from_numpy(got), want)


def test_keep_then_consensus_equals_the_reference() -> None:
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(2, 700, generator=g)
    keep = torch.rand(2, 700, generator=g) < 0.4
    factor = torch.tensor([2.5, 1.0])
    got = _consensus(
        tau.numpy(), np.ones(2, F32), fused.KEEP, True, keep=keep.numpy().view(np.uint8), factor=factor.numpy()
    )
    want = reference.ties_consensus(tau * keep * factor.unsqueeze(1), torch.ones(2), mass=1.0)
    assert torch.equal(torch.from_numpy(got), want)


def test_nth_tie_and_kth_counts() -> None:
    row = np.array([2.0, -1.0, -2.0, 2.0, 0.5, 2.0], F32)
    assert [fused.nth_tie(row, F32(2.0), q) for q in range(5)] == [0, 2, 3, 5, 6]
    value, below, equal = fused.kth_counts(np.array([3.0, -0.0, 0.0, 1.0, 0.0], F32), 2)
    assert (float(value), int(below), int(equal)) == (0.0, 0, 3)  # -0.0 and +0.0 count as one value
