"""Sign election (with its zero-sum fallback) and disjoint mean / sum."""

from __future__ import annotations

import torch

from guardmerge.methods.consensus import (
    disjoint_merge,
    elect_sign,
    ties_consensus,
    total_mass,
    weighted,
)

T = torch.tensor(
    [
        [0.0, -2.0, 0.0, 3.0],
        [-1.5, 1.0, 0.0, 0.0],
        [0.0, 0.0, -4.0, 2.5],
    ]
)


def test_election_and_disjoint_mean_golden() -> None:
    ones = torch.ones(3)
    gamma = elect_sign(T, total_mass(T))
    assert gamma.tolist() == [-1.0, -1.0, -1.0, 1.0]
    assert disjoint_merge(T, ones, gamma, "mean").tolist() == [-1.5, -2.0, -4.0, 2.75]
    assert disjoint_merge(T, ones, gamma, "sum").tolist() == [-1.5, -2.0, -4.0, 5.5]


def test_zero_sum_uses_sign_of_total_mass() -> None:
    t = torch.tensor([[1.0, 2.0, -5.0], [-1.0, 0.0, 0.0]])  # first column sums to 0
    assert float(total_mass(t)) == -3.0
    assert elect_sign(t, total_mass(t)).tolist() == [-1.0, 1.0, -1.0]
    assert ties_consensus(t, torch.ones(2)).tolist() == [-1.0, 2.0, -5.0]
    t_pos = torch.tensor([[1.0, 2.0, 5.0], [-1.0, 0.0, 0.0]])
    assert ties_consensus(t_pos, torch.ones(2)).tolist() == [1.0, 2.0, 5.0]
    # a zero mass falls back to +1
    assert elect_sign(torch.tensor([[1.0], [-1.0]]), 0.0).tolist() == [1.0]


def test_weights_multiply_before_the_election() -> None:
    w = torch.tensor([1.0, 2.0, 1.0])
    wt = weighted(T, w)
    assert wt[1].tolist() == [-3.0, 2.0, 0.0, 0.0]
    # column 1 sums to 0 after weighting; the mass (-1.5) elects '-'
    assert ties_consensus(T, w, "mean").tolist() == [-1.5, -2.0, -4.0, 2.75]
    assert ties_consensus(T, w, "sum").tolist() == [-3.0, -2.0, -4.0, 5.5]
    # an explicit (e.g. whole-model) positive mass flips the tied column to '+': 2 / w_2
    assert ties_consensus(T, w, "mean", mass=1.0).tolist() == [-1.5, 1.0, -4.0, 2.75]
    # ... and an explicit negative one elects '-' there, as the tensor's own mass did
    assert ties_consensus(T, w, "mean", mass=-1.0).tolist() == [-1.5, -2.0, -4.0, 2.75]


def test_no_agreeing_entry_gives_zero() -> None:
    t = torch.zeros(3, 2)
    assert ties_consensus(t, torch.ones(3)).tolist() == [0.0, 0.0]


def test_agreeing_signs_mean_equals_plain_mean() -> None:
    t = torch.rand(4, 10) + 0.1
    assert torch.allclose(ties_consensus(t, torch.ones(4)), t.mean(0))
