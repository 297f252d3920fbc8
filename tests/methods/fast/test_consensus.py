"""The chunked TIES consensus gives bit for bit what the whole-tensor reference gives."""

from __future__ import annotations

import pytest
import torch

import guardmerge.methods.fast.selection as selection
from guardmerge.methods.fast.consensus import ChunkConsensus
from guardmerge.methods.fast.selection import column_chunks
from guardmerge.methods.reference import ties_consensus

T = torch.tensor(
    [
        [0.0, -2.0, 0.0, 3.0],
        [-1.5, 1.0, 0.0, 0.0],
        [0.0, 0.0, -4.0, 2.5],
    ]
)


def chunked(sparse: torch.Tensor, weights: torch.Tensor, mode: str = "mean", mass: float | None = None) -> torch.Tensor:
    """:class:`ChunkConsensus` over the column chunks of ``sparse`` ``[N, d]``, then its finish."""
    agg = ChunkConsensus(weights, mode, mass)  # type: ignore[arg-type]
    return agg.finish(torch.cat([agg(start, chunk) for start, chunk in column_chunks(sparse)]))


@pytest.mark.parametrize("mode", ["mean", "sum"])
@pytest.mark.parametrize("mass", [None, 1.0, -1.0])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.0, 2.0, 1.0], [0.3, 0.5, 0.21]])
def test_goldens_equal_the_reference(mode: str, mass: float | None, weights: list[float]) -> None:
    w = torch.tensor(weights)
    assert torch.equal(chunked(T, w, mode, mass), ties_consensus(T, w, mode, mass))  # type: ignore[arg-type]


@pytest.mark.parametrize("width", [1, 3, 1000])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_random_chunks_equal_the_reference(monkeypatch: pytest.MonkeyPatch, width: int, sign: float) -> None:
    g = torch.Generator().manual_seed(width)
    sparse = sign * torch.rand(3, 500, generator=g) - 0.5 * sign * torch.rand(3, 500, generator=g)
    sparse[:, ::7] = torch.round(sparse[:, ::7] * 4) / 4  # ties and zeros
    sparse[1, 5], sparse[0, 5], sparse[2, 5] = 0.25, -0.25, 0.0  # a zero-sum column: the mass decides
    w = torch.tensor([0.3, 0.5, 0.21])
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 3 * width)
    for mode in ("mean", "sum"):
        assert torch.equal(chunked(sparse, w, mode), ties_consensus(sparse, w, mode))  # type: ignore[arg-type]


def test_per_tensor_zero_sum_patch_waits_for_the_last_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 2)  # one column per chunk (N = 2)
    sparse = torch.tensor([[1.0, 0.0, -4.0], [-1.0, 0.0, 0.0]])  # column 0 cancels; the mass (-4) comes last
    assert chunked(sparse, torch.ones(2)).tolist() == [-1.0, 0.0, -4.0]


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="consensus mode"):
        ChunkConsensus(torch.ones(2), "max")  # type: ignore[arg-type]
