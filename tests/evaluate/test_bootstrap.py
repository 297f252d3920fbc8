"""Percentile bootstrap intervals (guardmerge.evaluate.bootstrap) on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from guardmerge.errors import GuardmergeError
from guardmerge.evaluate import bootstrap
from guardmerge.evaluate.bootstrap import (
    Ratio,
    bootstrap_interval,
    joint_interval,
    macro_f1_scores,
    normalised_intervals,
)


def proportion(n: int, p: float) -> np.ndarray:
    """``n`` zeros and ones, a share ``p`` of them ones (shuffled)."""
    values = np.zeros(n)
    values[: round(n * p)] = 1.0
    return np.random.default_rng(1).permutation(values)


def test_constant_values_give_a_zero_width_interval_at_the_constant() -> None:
    assert bootstrap_interval([0.7] * 50) == pytest.approx((0.7, 0.7))
    assert bootstrap_interval(np.ones(3)) == (1.0, 1.0)


def test_a_known_proportion_lies_inside_and_the_interval_shrinks_as_1_over_sqrt_n() -> None:
    widths = {}
    for n in (100, 400, 1600):
        low, high = bootstrap_interval(proportion(n, 0.3))
        assert low < 0.3 < high
        widths[n] = high - low
        # the normal approximation of a proportion's 95% interval: 2 * 1.96 * sqrt(p (1 - p) / n)
        assert widths[n] == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / n), rel=0.15)
    assert widths[100] > widths[400] > widths[1600]
    assert widths[100] / widths[1600] == pytest.approx(4.0, rel=0.2)


def test_same_seed_same_interval_another_seed_another() -> None:
    values = proportion(200, 0.4)
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    assert bootstrap_interval(values, seed=3) != bootstrap_interval(values, seed=4)
    assert bootstrap_interval(values) == bootstrap_interval(values, draws=1000, seed=0, level=0.95)


def test_a_wider_level_gives_a_wider_interval() -> None:
    values = proportion(300, 0.5)
    low90, high90 = bootstrap_interval(values, level=0.90)
    low99, high99 = bootstrap_interval(values, level=0.99)
    assert low99 < low90 < 0.5 < high90 < high99


def test_a_statistic_of_the_indices_matches_the_mean_of_values() -> None:
    values = proportion(120, 0.25)
    by_values = bootstrap_interval(values, seed=5)
    by_statistic = bootstrap_interval(lambda idx: values[idx].mean(axis=1), len(values), seed=5)
    assert by_statistic == pytest.approx(by_values)


def test_chunked_draws_give_the_interval_of_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    values = proportion(250, 0.6)
    whole = bootstrap_interval(values)
    monkeypatch.setattr(bootstrap, "CHUNK_CELLS", 250 * 7)  # 7 draws a chunk
    assert bootstrap_interval(values) == pytest.approx(whole)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(GuardmergeError, match="draws"):
        bootstrap_interval([1.0, 0.0], draws=0)
    with pytest.raises(GuardmergeError, match="level"):
        bootstrap_interval([1.0, 0.0], level=1.5)
    with pytest.raises(GuardmergeError, match="needs n"):
        bootstrap_interval(lambda idx: idx.mean(axis=1))
    assert all(np.isnan(bootstrap_interval([])))


def test_ratio_of_sums_value_resamples_and_empty() -> None:
    # per-text matches and spans of an entity F1: 2*(1+0+2) / (2+1+4) = 6/7
    r = Ratio(np.array([2.0, 0.0, 4.0]), np.array([2.0, 1.0, 4.0]))
    assert r.value() == pytest.approx(6 / 7)
    idx = np.array([[0, 0, 0], [1, 1, 1], [0, 1, 2]])
    assert r.over(idx) == pytest.approx([1.0, 0.0, 6 / 7])
    assert Ratio(np.zeros(2), np.zeros(2)).value() == 1.0  # nothing on either side: full agreement
    low, high = r.interval()
    assert 0.0 <= low <= r.value() <= high <= 1.0
    agree = proportion(80, 0.75)
    assert Ratio(agree, np.ones(80)).interval(seed=2) == pytest.approx(bootstrap_interval(agree, seed=2))


def test_macro_f1_scores_match_scikit_learn_on_the_whole_set() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y, m, e = (rng.integers(0, 3, 60) for _ in range(3))
    n, score = macro_f1_scores(y, m, e, classes=3)
    merged, expert = score(np.arange(n)[None])
    assert merged[0] == pytest.approx(f1_score(y, m, labels=[0, 1, 2], average="macro", zero_division=0))
    assert expert[0] == pytest.approx(f1_score(y, e, labels=[0, 1, 2], average="macro", zero_division=0))
    idx = rng.integers(0, n, (4, n))  # and on resamples
    for row, value in zip(idx, score(idx)[0]):
        assert value == pytest.approx(f1_score(y[row], m[row], labels=[0, 1, 2], average="macro", zero_division=0))


def test_normalised_and_worst_task_intervals_resample_every_task() -> None:
    rng = np.random.default_rng(0)
    y_a, y_b = rng.integers(0, 2, 80), rng.integers(0, 3, 60)
    same = normalised_intervals({"a": macro_f1_scores(y_a, y_a, y_a, 2), "b": macro_f1_scores(y_b, y_b, y_b, 3)})
    assert same == pytest.approx(dict.fromkeys(same, 1.0))  # a merge equal to its experts: 1.0, zero width
    noisy_b = np.where(rng.random(60) < 0.3, (y_b + 1) % 3, y_b)  # task b: 30% of its answers changed
    out = normalised_intervals({"a": macro_f1_scores(y_a, y_a, y_a, 2), "b": macro_f1_scores(y_b, noisy_b, y_b, 3)})
    assert out["worst"] < out["normalised"] < 1.0
    assert out["normalised"] == pytest.approx((1.0 + out["worst"]) / 2)
    for name in ("normalised", "worst"):
        assert out[f"{name}_low"] < out[name] < out[f"{name}_high"] <= 1.0
    assert normalised_intervals({"b": macro_f1_scores(y_b, noisy_b, y_b, 3)}, seed=1) != normalised_intervals(
        {"b": macro_f1_scores(y_b, noisy_b, y_b, 3)}, seed=2
    )


def test_joint_interval_hands_each_task_its_own_resamples() -> None:
    seen: dict[str, tuple[int, ...]] = {}

    def stat(idx: dict[str, np.ndarray]) -> np.ndarray:
        seen.update({t: v.shape for t, v in idx.items()})
        return idx["a"].mean(axis=1) + idx["b"].mean(axis=1)

    low, high = joint_interval({"a": 10, "b": 30}, stat, draws=50)
    assert seen == {"a": (50, 10), "b": (50, 30)}
    assert 4.5 + 14.5 - 6 < low < high < 4.5 + 14.5 + 6  # the means of 0..9 and 0..29
