"""Scoring candidates: the objective's aggregation and the real merge scorer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from guardmerge.errors import ConfigError
from guardmerge.evaluate import classification_metrics
from guardmerge.search import Candidate, MergeScorer, SearchJob, aggregate
from tests.search.conftest import LABELS, TASKS, zoo_config


def test_aggregate_mean_worst_weighted() -> None:
    scores = {"a": 0.9, "b": 0.5, "c": 0.7}
    assert aggregate(scores) == pytest.approx(0.7)
    assert aggregate(scores, "worst") == 0.5
    assert aggregate(scores, "weighted", {"a": 2.0, "b": 0.0}) == pytest.approx((1.8 + 0.7) / 3)
    with pytest.raises(ConfigError, match="sum to a positive"):
        aggregate(scores, "weighted", {"a": 0.0, "b": 0.0, "c": 0.0})


def test_scorer_scores_an_expert_reproduced_exactly_at_one(search_zoo: dict[str, Path], val_data: Path) -> None:
    """One expert, task arithmetic at scaling 1: the merge is the expert, whose predictions are
    the validation labels, so it scores what perfect predictions score; scaling 0 (the base)
    scores lower."""
    job = SearchJob(config=zoo_config(search_zoo, tasks=("sentiment",)), data_dir=str(val_data))
    scorer = MergeScorer(job)
    labels = scorer.val["sentiment"].labels
    best = classification_metrics(labels, labels, LABELS["sentiment"])["macro_f1"]  # perfect predictions
    steps: list[tuple[int, dict]] = []
    exact = scorer(Candidate({"scaling": 1.0}, (1.0,)), lambda s, sc: steps.append((s, dict(sc))))
    assert exact == {"sentiment": pytest.approx(best)}
    assert steps == [(0, {"sentiment": pytest.approx(best)})]
    assert scorer(Candidate({"scaling": 0.0}, (1.0,)), lambda s, sc: None)["sentiment"] < best


def test_scorer_reports_after_every_task_and_reuses_seen_candidates(
    search_zoo: dict[str, Path], val_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = MergeScorer(SearchJob(config=zoo_config(search_zoo), data_dir=str(val_data)))
    steps: list[int] = []
    first = scorer(Candidate({"scaling": 0.5}, (1.0, 1.0, 1.0)), lambda s, sc: steps.append(s))
    assert steps == [0, 1, 2] and set(first) == set(TASKS)
    import guardmerge.merge.stages

    monkeypatch.setattr(guardmerge.merge.stages, "build", lambda *a, **k: pytest.fail("merged again"))
    assert scorer(Candidate({"scaling": 0.5}, (1.0, 1.0, 1.0)), lambda s, sc: None) == first


def test_scorer_names_the_missing_task_folder_or_split(
    search_zoo: dict[str, Path], val_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="no folder for task 'hate'"):
        MergeScorer(SearchJob(config=zoo_config(search_zoo), data_dir=str(tmp_path)))
    partial = tmp_path / "d"
    shutil.copytree(val_data, partial)
    (partial / "hate" / "validation.jsonl").unlink()
    with pytest.raises(ConfigError, match="task 'hate' has no validation split"):
        MergeScorer(SearchJob(config=zoo_config(search_zoo), data_dir=str(partial)))
