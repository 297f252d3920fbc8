"""The whole-tensor reference: hand-checked goldens, the papers' invariants, and PCB against the
authors' algorithm. (The registered methods are checked against this module in their own tests.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guardmerge.methods import reference as R
from guardmerge.methods.reference import disjoint_merge, elect_sign, ties_consensus, total_mass, weighted

T = torch.tensor(
    [
        [0.0, -2.0, 0.0, 3.0],
        [-1.5, 1.0, 0.0, 0.0],
        [0.0, 0.0, -4.0, 2.5],
    ]
)
TAU = torch.tensor(
    [
        [1.0, -2.0, 0.5, 3.0],
        [-1.5, 1.0, 0.25, -0.5],
        [2.0, -0.5, -4.0, 2.5],
    ]
)


# ------------------------------------------------------------------ TIES election and merge


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


def test_unknown_consensus_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="consensus mode"):
        disjoint_merge(T, torch.ones(3), torch.ones(4), "max")  # type: ignore[arg-type]


# --------------------------------------------------------------------- trim, TIES, breadcrumbs


def test_trim_keeps_the_largest_and_breaks_ties_by_the_lower_index() -> None:
    assert R.trim(TAU[:2], 0.5).tolist() == [[0.0, -2.0, 0.0, 3.0], [-1.5, 1.0, 0.0, 0.0]]
    tau = torch.tensor([[1.0, -3.0, 3.0, 2.0, -3.0]])  # three |3| tie for 2 places
    assert (R.trim(tau, 0.4) != 0).tolist() == [[False, True, True, False, False]]
    assert torch.equal(R.trim(tau.reshape(1, 5, 1), 0.4).reshape(1, 5), R.trim(tau, 0.4))  # row-major order
    assert not R.trim(torch.ones(2, 3), 0.2).any()  # floor(0.2 * 3) = 0 kept
    assert R.floor_of(100, 0.29) == 29  # the decimal value, not 0.29 * 100 = 28.999...


def test_ties_golden_with_sign_conflicts() -> None:
    # trimmed (top 2 of 4 each): [0,-2,0,3], [-1.5,1,0,0], [0,0,-4,2.5]; signs [-,-,-,+]
    assert R.ties(TAU, torch.ones(3), density=0.5).tolist() == [-1.5, -2.0, -4.0, 2.75]
    assert R.ties(TAU, torch.ones(3), 0.5, 2.0, "sum").tolist() == [-3.0, -4.0, -8.0, 11.0]


def test_breadcrumbs_golden() -> None:
    tau = torch.tensor([[0.1, -0.5, 0.3, -0.9, 0.7], [0.9, 0.1, -0.2, 0.3, -0.4]])
    # density 0.4, gamma 0.2: drop the top 1, keep the next 2: expert 1 keeps 0.7 and -0.5, expert 2 -0.4 and 0.3
    out = R.breadcrumbs(tau, torch.ones(2), density=0.4, gamma=0.2, scaling=1.0)
    assert torch.allclose(out, torch.tensor([0.0, -0.5, 0.0, 0.3, 0.3]))
    # TIES consensus: column 4 is 0.7 vs -0.4 -> '+' wins: 0.7
    ties_out = R.breadcrumbs_ties(tau, torch.ones(2), density=0.4, gamma=0.2)
    assert torch.allclose(ties_out, torch.tensor([0.0, -0.5, 0.0, 0.3, 0.7]))


def test_breadcrumbs_window_edges() -> None:
    tau = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(R.breadcrumbs_mask(tau, 0.25, 0.0), R.trim(tau, 0.25) != 0)  # gamma 0: the trim
    assert R.breadcrumbs_mask(tau[:, :10], 1.0, 0.1).all()  # density wins over gamma
    top_tie = torch.tensor([[4.0, -4.0, 1.0, 2.0, 3.0]])  # n_top = 1 of the two |4|
    assert R.breadcrumbs_mask(top_tie, 0.4, 0.2).tolist() == [[False, True, False, False, True]]


# -------------------------------------------------------------------------------------- DARE


def test_dare_golden_given_the_draws() -> None:
    tau = torch.tensor([[1.0, -2.0, 3.0, 4.0], [0.5, 0.5, -0.5, 0.5]])
    seeds = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(7)).tolist()
    keep = torch.stack([torch.rand(4, generator=torch.Generator().manual_seed(s)) < 0.5 for s in seeds])
    assert torch.equal(R.dare(tau, 0.5, torch.Generator().manual_seed(7)), tau * keep * 2.0)
    assert torch.equal(R.dare(tau, 0.5, torch.Generator().manual_seed(7), rescale=False), tau * keep)
    assert R.dare(tau, 1.0, torch.Generator()) is tau  # density 1: the identity


def test_dare_rescales_to_keep_the_sum_or_the_l1_norm() -> None:
    out = R.dare(torch.ones(1, 200_000), 0.3, torch.Generator().manual_seed(3))
    assert float((out != 0).float().mean()) == pytest.approx(0.3, abs=0.005)
    assert float(out.sum()) == pytest.approx(200_000, rel=0.02)
    tau = torch.tensor([[1.0, -2.0, 3.0, 4.0] * 5, [0.0] * 20])
    l1 = R.dare(tau, 0.5, torch.Generator().manual_seed(1), rescale_by="l1")
    assert torch.allclose(l1.abs().sum(1), tau.abs().sum(1))  # the zero row stays 0


# ------------------------------------------------------------- average, TA, model stock, PCB


def test_average_and_task_arithmetic_golden() -> None:
    deltas = torch.tensor([[1.0, 2.0], [5.0, -2.0]])
    assert R.average(deltas, torch.tensor([1.0, 3.0])).tolist() == [4.0, -1.0]
    assert R.task_arithmetic(deltas, torch.tensor([1.0, 3.0]), 0.5).tolist() == [8.0, -2.0]


def test_model_stock_golden() -> None:
    # cos = 1/sqrt(2); t = 2c / (c + 1); mean = [1, 0.5]
    t = 2 * (math.sqrt(2) - 1)
    out = R.model_stock(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.ones(2))
    assert torch.allclose(out, torch.tensor([t, 0.5 * t]))
    assert torch.equal(R.model_stock(torch.tensor([[1.0, 0.0], [-1.0, 0.1]]), torch.ones(2)), torch.zeros(2))


def authors_pcb(tau: np.ndarray, ratio: float, clip: float) -> np.ndarray:
    """The authors' algorithm, transcribed from the paper and their sort-based indexing."""
    n, d = tau.shape
    a = np.abs(tau)
    s = np.sort(a, axis=1)
    lo = s[:, int(round(d * clip, 9))][:, None]
    hi = s[:, max(int(round(d * (1 - clip), 9) - 1), 0)][:, None]
    a = np.clip(a, lo, hi)
    clamped = np.sign(tau) * a
    norm = (a - a.min(1, keepdims=True)) / (a.max(1, keepdims=True) - a.min(1, keepdims=True))
    beta = np.exp(n * norm**2) * np.tanh(tau * tau.sum(0))
    sb = np.sort(beta, axis=1)
    blo = sb[:, int(round(d * (1 - ratio), 9))][:, None]
    b = np.maximum(beta, blo)
    scale = (b - blo) / (b.max(1, keepdims=True) - blo)
    return (clamped * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)


@pytest.mark.parametrize(("n", "d", "ratio", "clip"), [(3, 200, 0.1, 0.01), (5, 97, 0.2, 0.05), (2, 50, 0.5, 0.0)])
def test_pcb_matches_the_authors_algorithm(n: int, d: int, ratio: float, clip: float) -> None:
    tau = torch.randn(n, d, generator=torch.Generator().manual_seed(d)) * 0.01
    tau[0, :5] *= 30  # outliers for the clamp
    out = R.pcb(tau, torch.ones(n), density=ratio, clip=clip)
    ref = authors_pcb(tau.numpy().astype(np.float64), ratio, clip)
    assert np.allclose(out.numpy(), ref, rtol=1e-4, atol=1e-7)


def test_pcb_softmax_inter_sums_one_softmax_per_expert() -> None:
    tau = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    out = R.pcb(tau, torch.ones(3), density=0.3, inter="softmax")
    assert torch.isfinite(out).all() and (out != 0).any()
    assert torch.equal(R.pcb(torch.zeros(3, 8), torch.ones(3)), torch.zeros(8))  # no NaN on constant input


# ---------------------------------------------------------------------- RegMean, Fisher, WUDI


def test_regmean_is_joint_least_squares_and_fisher_its_formula() -> None:
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(30, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    taus = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    grams = torch.stack([x.T @ x for x in xs])
    joint = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ t.T for x, t in zip(xs, taus)])).solution.T
    torch.testing.assert_close(R.regmean(taus, grams, torch.ones(2)), joint)
    fishers = torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    identical = R.fisher(taus, fishers[:1].expand(2, 3, 5), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(identical, (taus[0] + 3 * taus[1]) / 4)


def test_wudi_with_orthogonal_row_spaces_is_the_sum() -> None:
    taus = torch.zeros(2, 3, 4, dtype=torch.float64)
    taus[0, :, :2] = torch.randn(3, 2, dtype=torch.float64)
    taus[1, :, 2:] = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(R.wudi(taus, torch.ones(2), rho=0.0), taus.sum(0))
