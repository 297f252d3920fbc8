"""Scoring a search candidate: merge, then macro-F1 per task on capped validation subsets.

A :class:`MergeScorer` is built once per worker process from a picklable :class:`SearchJob`
and keeps everything that does not change between trials: the validation subsets, tokenised
once into batches; the experts' statistics (RegMean, Fisher), computed once; the experts' head
features for head alignment (a :class:`~guardmerge.merge.align.FeatureCache` on disk, shared by the
workers); and the scores of candidates already seen. Per trial it re-merges the encoder
(reading the checkpoints, which the OS keeps cached) and runs the merged model over the
batches, task by task, reporting the scores so far so hopeless trials are pruned early.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from guardmerge.config import MergeConfig
from guardmerge.errors import ConfigError, GuardmergeError
from guardmerge.search.space import Candidate

if TYPE_CHECKING:
    from guardmerge.merge.job import MergeJob

log = logging.getLogger(__name__)

Objective = Literal["mean", "worst", "weighted"]
Report = Callable[[int, Mapping[str, float]], None]
"""``report(step, scores so far)``: may raise ``optuna.TrialPruned``."""


def aggregate(
    scores: Mapping[str, float], objective: Objective = "mean", task_weights: Mapping[str, float] | None = None
) -> float:
    """The search objective from per-task macro-F1: mean, worst task, or weighted mean.

    Tasks missing from ``task_weights`` weigh 1.
    """
    if not scores:
        raise ValueError("no task scores to aggregate")
    if objective == "worst":
        return min(scores.values())
    if objective == "weighted":
        w = {t: float((task_weights or {}).get(t, 1.0)) for t in scores}
        total = sum(w.values())
        if total <= 0:
            raise ConfigError("task weights must sum to a positive number")
        return sum(w[t] * s for t, s in scores.items()) / total
    return sum(scores.values()) / len(scores)


class Scorer(Protocol):
    """Scores one candidate: ``{task: macro_f1}``, calling ``report`` after each task."""

    def __call__(self, candidate: Candidate, report: Report) -> dict[str, float]: ...


@dataclass(frozen=True)
class SearchJob:
    """Everything a worker needs to build its :class:`MergeScorer` (picklable).

    Attributes:
        config: the merge config, validated once (a pydantic model: it pickles to workers).
        data_dir: folder with one sub-folder per task holding ``validation.jsonl``.
        val_limit: validation examples per task (first n), None for all.
        work_dir: cache folder (statistics, expert features) shared by the workers.
        max_length, batch_size: tokenisation and evaluation batch settings.
    """

    config: MergeConfig
    data_dir: str
    val_limit: int | None = 200
    work_dir: str | None = None
    max_length: int = 128
    batch_size: int = 64


class MergeScorer:
    """The real scorer: merge the candidate and evaluate it on the validation subsets."""

    def __init__(self, job: SearchJob) -> None:
        from guardmerge.data import load_task
        from guardmerge.merge.align import FeatureCache
        from guardmerge.merge.job import MergeJob

        self.job = job
        self.merge_job = MergeJob.of(job.config)
        self.spec = self.merge_job.spec
        self.tasks = self.merge_job.tasks
        root = Path(job.data_dir)
        self.val = {}
        for task in self.tasks:
            folder = root / task
            if not folder.is_dir():
                raise ConfigError(f"search data: no folder for task '{task}' in {root}")
            td = load_task(folder)
            if not td.has("validation"):
                raise ConfigError(f"search data: task '{task}' has no validation split in {folder}")
            self.val[task] = td.split("validation", job.val_limit)
            if not self.val[task].labelled:
                raise ConfigError(f"search data: {folder} validation split has no labels")
        work = Path(job.work_dir) if job.work_dir else None
        self.features = FeatureCache(work / "features") if work else None
        self.stats_dir = work / "stats" if work else None
        self._stats: Any = None
        self._batches: dict[str, list[dict[str, torch.Tensor]]] | None = None
        self._seen: dict[str, dict[str, float]] = {}
        self._open = ExitStack()  # the job stays open across trials: each model is read once

    def close(self) -> None:
        """Close the merge job's checkpoints."""
        self._open.close()

    def config_for(self, candidate: Candidate) -> MergeJob:
        """The merge job of ``candidate``: the search's open job with its parameters and weights."""
        if not self.merge_job.is_open:
            self._open.enter_context(self.merge_job.open())
        return self.merge_job.with_candidate(candidate.parameters, candidate.weights)

    def statistics(self, config: MergeJob) -> Any:
        """Per-expert statistics: computed once, or per candidate when the method sparsifies
        the experts first (their statistics then depend on density and seed)."""
        from guardmerge.merge.statistics import expert_statistics

        if not self.spec.needs:
            return None
        if self.spec.sparsify is not None:
            return expert_statistics(config, self.spec.needs, progress=False, cache=self.stats_dir)
        if self._stats is None:
            self._stats = expert_statistics(config, self.spec.needs, progress=False, cache=self.stats_dir)
        return self._stats

    def _tokenised(self, tokenizer: Any) -> dict[str, list[dict[str, torch.Tensor]]]:
        if self._batches is None:
            if tokenizer is None:
                raise GuardmergeError("search: no tokenizer in the base or expert folders")
            bs = self.job.batch_size
            self._batches = {
                task: [
                    dict(
                        tokenizer(
                            ex.texts[i : i + bs],
                            padding=True,
                            truncation=True,
                            max_length=self.job.max_length,
                            return_tensors="pt",
                        )
                    )
                    for i in range(0, len(ex.texts), bs)
                ]
                for task, ex in self.val.items()
                if ex.labels is not None
            }
        return self._batches

    def __call__(self, candidate: Candidate, report: Report) -> dict[str, float]:
        from guardmerge.evaluate import classification_metrics, evaluate
        from guardmerge.merge.stages import build

        key = candidate.key()
        if key in self._seen:
            log.debug("candidate seen before; score reused")
            return dict(self._seen[key])
        config = self.config_for(candidate)
        result = build(config, progress=False, stats=self.statistics(config), feature_cache=self.features)
        model = result.to_model().eval()
        batches = self._tokenised(model.tokenizer)
        scores: dict[str, float] = {}
        with torch.no_grad():
            for step, task in enumerate(self.tasks):
                if not model.kind(task).exclusive:  # multi-label and token heads: their macro-F1 by evaluate
                    bs, length = self.job.batch_size, self.job.max_length
                    res = evaluate(model, {task: self.val[task]}, batch_size=bs, max_length=length)
                    scores[task] = res[task]["macro_f1"]
                    report(step, scores)
                    continue
                pred = torch.cat([model(tasks=[task], **b)[task].argmax(-1) for b in batches[task]])
                labels = self.val[task].labels or []
                scores[task] = classification_metrics(labels, pred.tolist(), model.labels(task))["macro_f1"]
                report(step, scores)
        self._seen[key] = dict(scores)
        return scores
