"""Percentile bootstrap intervals over resampled texts (numpy, vectorised over draws).

A draw resamples the ``n`` texts with replacement (an index matrix ``[draws, n]``) and recomputes
the statistic; the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
draws. The defaults (1,000 draws, seed 0, 95%) make every interval reproducible.

- :func:`bootstrap_interval`: the mean of per-text values, or any statistic of the indices;
- :class:`Ratio`: a statistic that is a ratio of per-text sums (an agreement, an entity F1, a
  per-token agreement), with its value and interval;
- :func:`joint_interval` and :func:`normalised_intervals`: statistics over several tasks, each
  draw resampling every task's texts (the normalised score and the worst-task ratio);
  :func:`macro_f1_scores` gives them a task's macro-F1 of the merged model and of its expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from guardmerge.errors import GuardmergeError

__all__ = [
    "DRAWS",
    "LEVEL",
    "SEED",
    "Ratio",
    "TaskScores",
    "bootstrap_interval",
    "joint_interval",
    "macro_f1_scores",
    "normalised_intervals",
]

DRAWS = 1000
SEED = 0
LEVEL = 0.95
CHUNK_CELLS = 4_000_000
"""Most resampled indices held at once (``draws x n``); larger jobs run in chunks of draws."""

Statistic = Callable[[np.ndarray], np.ndarray]
"""``indices [k, n] -> [k]``: a statistic of each of ``k`` resamples of ``n`` texts."""

TaskScores = tuple[int, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]]
"""``(n, score)``: a task's text count and ``indices [k, n] -> (merged [k], expert [k])``, the
task metric of the merged model and of its expert on each resample."""


def _check(draws: int, level: float) -> None:
    if draws < 1:
        raise GuardmergeError(f"bootstrap draws must be at least 1, got {draws}")
    if not 0.0 < level < 1.0:
        raise GuardmergeError(f"bootstrap level must lie in (0, 1), got {level}")


def _chunks(sizes: Mapping[str, int], draws: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Resampled indices ``{name: [k, n_name]}`` in chunks of ``k`` draws (``draws`` in all),
    every name resampled in each draw, from one generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    step = max(1, min(draws, CHUNK_CELLS // max(1, sum(sizes.values()))))
    for start in range(0, draws, step):
        k = min(step, draws - start)
        yield {name: rng.integers(0, n, size=(k, n)) for name, n in sizes.items()}


def _quantiles(values: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of the draws (NaN draws ignored; NaN when every draw is)."""
    finite = values[~np.isnan(values)]
    if not len(finite):
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_interval(
    values: np.ndarray | list[float] | Statistic,
    n: int | None = None,
    *,
    draws: int = DRAWS,
    seed: int = SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """The percentile bootstrap interval ``(low, high)`` of a statistic over ``n`` texts.

    Args:
        values: per-text values ``[n]`` (the statistic is their mean), or a :data:`Statistic`
            (``indices [k, n] -> [k]``, which needs ``n``).
        n: the number of texts (default: ``len(values)``).
        draws: resamples; seed: the generator's seed; level: the interval's coverage.

    Returns:
        ``(nan, nan)`` for no texts.
    """
    _check(draws, level)
    if callable(values):
        if n is None:
            raise GuardmergeError("bootstrap_interval of a statistic needs n, the number of texts")
        statistic = values
    else:
        per_text = np.asarray(values, dtype=np.float64)
        n = len(per_text) if n is None else n
        if n != len(per_text):
            raise GuardmergeError(f"bootstrap_interval: {len(per_text)} values for n = {n} texts")

        def statistic(idx: np.ndarray) -> np.ndarray:
            return per_text[idx].mean(axis=1)

    if n == 0:
        return float("nan"), float("nan")
    stats = np.concatenate([statistic(chunk["x"]) for chunk in _chunks({"x": n}, draws, seed)])
    return _quantiles(np.asarray(stats, dtype=np.float64), level)


@dataclass(frozen=True)
class Ratio:
    """A statistic over texts that is a ratio of per-text sums, ``sum(num) / sum(den)`` over the
    texts taken, and ``empty`` where the denominators sum to 0.

    An agreement has ``num`` 1 where the verdicts agree and ``den`` 1; an entity F1 has ``num``
    twice the matching spans and ``den`` the spans of both sides (no span on either side: 1.0);
    a per-token agreement has the matching and the counted tokens of each text.

    Attributes:
        num, den: ``[n]`` per-text numerators and denominators.
        empty: the value when ``den`` sums to 0.
    """

    num: np.ndarray
    den: np.ndarray
    empty: float = 1.0

    def __len__(self) -> int:
        return len(self.num)

    def over(self, idx: np.ndarray) -> np.ndarray:
        """``[k]``: the ratio on each resample ``idx [k, n]``."""
        num = np.asarray(self.num, dtype=np.float64)[idx].sum(axis=-1)
        den = np.asarray(self.den, dtype=np.float64)[idx].sum(axis=-1)
        out = np.full(num.shape, self.empty, dtype=np.float64)
        np.divide(num, den, out=out, where=den != 0)
        return out

    def value(self) -> float:
        """The ratio on every text (NaN for no texts)."""
        if not len(self):
            return float("nan")
        return float(self.over(np.arange(len(self))[None])[0])

    def interval(self, *, draws: int = DRAWS, seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
        """:func:`bootstrap_interval` of the ratio."""
        return bootstrap_interval(self.over, len(self), draws=draws, seed=seed, level=level)


def joint_interval(
    sizes: Mapping[str, int],
    statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray],
    *,
    draws: int = DRAWS,
    seed: int = SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """The percentile interval of a statistic over several tasks: each draw resamples every
    task's texts (``sizes``: task -> text count) and ``statistic({task: indices [k, n_task]})``
    gives ``[k]`` values."""
    _check(draws, level)
    if not sizes or not all(sizes.values()):
        return float("nan"), float("nan")
    stats = np.concatenate([np.asarray(statistic(chunk), np.float64) for chunk in _chunks(sizes, draws, seed)])
    return _quantiles(stats, level)


def normalised_intervals(
    scores: Mapping[str, TaskScores],
    *,
    draws: int = DRAWS,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict[str, float]:
    """The normalised score (mean over tasks of ``merged / expert``) and the worst-task ratio
    (their minimum), with intervals from resampling every task's texts jointly.

    Args:
        scores: task -> :data:`TaskScores` (:func:`macro_f1_scores` for a single-label task).

    Returns:
        ``normalised``, ``normalised_low``, ``normalised_high``, ``worst``, ``worst_low``,
        ``worst_high`` (a task whose expert scores 0 on a resample is left out of that draw).
    """
    sizes = {t: n for t, (n, _) in scores.items()}

    def ratios(idx: Mapping[str, np.ndarray]) -> np.ndarray:  # [k, tasks]
        cols = []
        for task, (_, score) in scores.items():
            merged, expert = (np.asarray(v, dtype=np.float64) for v in score(idx[task]))
            col = np.full(merged.shape, np.nan)
            np.divide(merged, expert, out=col, where=expert != 0)
            cols.append(col)
        return np.stack(cols, axis=-1)

    def nan_stat(fn: Callable[..., np.ndarray]) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
        def stat(idx: Mapping[str, np.ndarray]) -> np.ndarray:
            r = ratios(idx)
            out = np.full(len(r), np.nan)
            some = ~np.isnan(r).all(axis=-1)
            out[some] = fn(r[some], axis=-1)
            return out

        return stat

    whole = {t: np.arange(n)[None] for t, n in sizes.items()}
    out: dict[str, float] = {}
    for name, fn in (("normalised", np.nanmean), ("worst", np.nanmin)):
        stat = nan_stat(fn)
        out[name] = float(stat(whole)[0]) if sizes and all(sizes.values()) else float("nan")
        out[f"{name}_low"], out[f"{name}_high"] = joint_interval(sizes, stat, draws=draws, seed=seed, level=level)
    return out


def macro_f1_scores(
    y_true: np.ndarray | list[int], merged: np.ndarray | list[int], expert: np.ndarray | list[int], classes: int
) -> TaskScores:
    """A single-label task's :data:`TaskScores`: macro-F1 over ``classes`` labels (a label
    never true nor predicted scores 0, as scikit-learn's ``zero_division=0``) of the merged
    model's and the expert's predictions ``[n]`` against ``y_true`` ``[n]``, on each resample."""
    t, m, e = (np.asarray(v, dtype=np.int64) for v in (y_true, merged, expert))
    if not len(t) == len(m) == len(e):
        raise GuardmergeError(f"macro_f1_scores: {len(t)} labels, {len(m)} and {len(e)} predictions")

    def f1(pred: np.ndarray, idx: np.ndarray) -> np.ndarray:
        k = len(idx)
        rows = np.repeat(np.arange(k), idx.shape[1])
        pairs = (rows * classes + t[idx].ravel()) * classes + pred[idx].ravel()
        cm = np.bincount(pairs, minlength=k * classes * classes).reshape(k, classes, classes)
        tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
        support = cm.sum(axis=2) + cm.sum(axis=1)  # true + predicted per label
        per = np.zeros_like(tp)
        np.divide(2 * tp, support, out=per, where=support > 0)
        return per.mean(axis=1)

    return len(t), lambda idx: (f1(m, idx), f1(e, idx))
