"""The guard benchmark's shared state and measurements (used by benchmarks/guard.py, guard_search.py
and vs_llm_guard.py): the experts and their data, merges built and cached as the benchmark
builds them, scores on validation or test, and timings of runners on the same tokenised texts.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from guardmerge.config import MergeConfig, parse_config
from guardmerge.data import TaskData, load_task
from guardmerge.demo import base_checkpoint
from guardmerge.evaluate import evaluate, mean, normalized
from guardmerge.merge.align import FeatureCache
from guardmerge.merge.job import MergeJob
from guardmerge.merge.result import MergeResult
from guardmerge.merge.stages import STAGES, MergeState, _sync, build
from guardmerge.merge.statistics import expert_statistics
from guardmerge.models.multihead import MultiHeadModel, load_any

ALIGN = {"method": "lstsq", "examples": 400}
STATS = {"examples": 1000, "max_length": 128, "batch_size": 32}
FISHER_EXAMPLES = 256
REFIT_STAGES = ("branch alignment", "head alignment")
"""The stages after the layer-wise solves: what a solved merge's ``+align`` variant reruns."""
Runner = Callable[[Mapping[str, torch.Tensor]], Any]
"""``fn(batch)``: one model (or several) run on one tokenised batch."""


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


class Bench:
    """Shared state: experts, data, cached statistics and expert features."""

    def __init__(
        self, data: Path, work: Path, experts: Mapping[str, Path], val_limit: int | None, test_limit: int | None
    ):
        self.base = str(base_checkpoint())
        self.experts = dict(experts)
        self.tasks: dict[str, TaskData] = {t: load_task(data / t) for t in experts}
        self.val = {t: td.split("validation", val_limit) for t, td in self.tasks.items()}
        self.test = {t: td.split("test", test_limit) for t, td in self.tasks.items()}
        self.features = FeatureCache(work / "features")
        self.stats_cache: dict[str, Any] = {}
        self.solved: dict[str, MergeResult] = {}
        self.work = work

    def config(
        self,
        method: str,
        params: Mapping[str, Any],
        *,
        tasks: Sequence[str] | None = None,
        align: bool = False,
        heads: str = "multi",
        seed: int = 0,
        weights: Mapping[str, float] | None = None,
        **extra: Any,
    ) -> MergeConfig:
        chosen = list(tasks or self.experts)
        return parse_config(
            {
                "base_model": self.base,
                "experts": [
                    {
                        "model": str(self.experts[t]),
                        "task": t,
                        "weight": (weights or {}).get(t, 1.0),
                        "data": str(self.tasks[t].folder / "train.jsonl"),
                    }
                    for t in chosen
                ],
                "method": method,
                "parameters": dict(params),
                "heads": heads,
                "seed": seed,
                "align_heads": ALIGN if align else False,
                "statistics": {**STATS, "examples": FISHER_EXAMPLES if method == "fisher" else STATS["examples"]},
                **extra,
            },
            source=f"{method} {dict(params)}",
        )

    def merged(self, cfg: MergeConfig) -> MultiHeadModel:
        """The merged model of ``cfg``. A layer-wise merge is solved once per setting: its
        ``+align`` variant refits the heads on a copy of the solved merge (same result as a
        fresh build, without solving the layers twice)."""
        job = MergeJob.of(cfg)
        stats = None
        if job.statistics:
            key = f"{'+'.join(sorted(job.statistics))}:{','.join(job.tasks)}"
            if key not in self.stats_cache:
                self.stats_cache[key] = expert_statistics(
                    job, job.statistics, progress=False, cache=self.work / "stats"
                )
            stats = self.stats_cache[key]
        if not job.layerwise:
            return build(job, progress=False, stats=stats, feature_cache=self.features).to_model()
        plain = cfg.model_copy(update={"align_heads": False})
        key = plain.model_dump_json()
        if key not in self.solved:
            while len(self.solved) >= 6:  # a grid's worth of solved merges (~90 MB each for MiniLM)
                self.solved.pop(next(iter(self.solved)))
            self.solved[key] = build(MergeJob.of(plain), progress=False, feature_cache=self.features)
        if job.alignment is None:
            return self.solved[key].to_model()
        solved = self.solved[key]
        copy = replace(solved, tensors={k: v.clone() for k, v in solved.tensors.items()}, info=dict(solved.info))
        return self.refit(job, copy).to_model()

    def refit(self, job: MergeJob, solved: MergeResult) -> MergeResult:
        """:data:`REFIT_STAGES` of ``job`` (branch alignment, head alignment, as the job asks) on
        ``solved``, a merge whose layer-wise solves are done, in place."""
        state = MergeState(result=solved, progress=False, feature_cache=self.features)
        with job.open():
            for stage in STAGES:
                if stage.name in REFIT_STAGES and stage.applies(job):
                    stage.run(job, state)
        return _sync(state)

    def score(
        self, model: MultiHeadModel, split: str, tasks: Sequence[str] | None = None
    ) -> dict[str, dict[str, float]]:
        data = self.val if split == "validation" else self.test
        return evaluate(model, {t: data[t] for t in (tasks or model.tasks)})


def test_scores(test: dict[str, dict[str, float]], expert_test: dict[str, Any]) -> dict[str, Any]:
    """A row's test figures: per-task scores, mean macro-F1, normalised (mean and per task), worst task."""
    per_task = normalized(test, expert_test)
    return {
        "test": test,
        "mean_macro_f1": mean({t: v["macro_f1"] for t, v in test.items()}),
        "normalized": mean(per_task),
        "normalized_per_task": per_task,
        "worst_task": min(per_task, key=per_task.__getitem__),
        "worst_task_ratio": min(per_task.values()),
    }


def best_row(results: Mapping[str, Any]) -> str:
    """The best single-pass quality row by validation mean macro-F1."""
    methods = results.get("methods", {})
    rows = {k: m for k, m in methods.items() if k != "ensemble" and "validation_mean_macro_f1" in m}
    if not rows:
        raise SystemExit("benchmarks/results/guard.json has no quality rows: run python benchmarks/guard.py first")
    return max(rows, key=lambda k: rows[k]["validation_mean_macro_f1"])


def _latencies(fn: Runner, batches: Sequence[Mapping[str, torch.Tensor]], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        for b in batches:
            t0 = time.perf_counter()
            fn(b)
            times.append(time.perf_counter() - t0)
    return times


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]


@torch.no_grad()
def timings(
    bench: Bench, runners: Mapping[str, Runner], tokenizer: Any, n_texts: int = 320, repeats: int = 3
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Texts/s at batch 32 and batch-1 latency of each runner (``fn(batch)``) on the same
    tokenised test texts of every task; runners alternate so machine noise hits them alike.
    Returns the figures per runner and the settings (``n`` texts, ``repeats``)."""
    texts = [t for task in bench.tasks for t in bench.test[task].texts[: n_texts // len(bench.tasks)]]

    def batches(size: int) -> list[dict[str, torch.Tensor]]:
        return [
            dict(tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(texts), size)
        ]

    b32, b1 = batches(32), batches(1)[:64]
    for fn in runners.values():  # warm up
        fn(b32[0])
    big: dict[str, list[float]] = {name: [] for name in runners}
    small: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            big[name].append(sum(_latencies(fn, b32, 1)))
            small[name] += _latencies(fn, b1, 1)
    return {
        name: {
            "batch32_texts_per_s": len(texts) / statistics.median(big[name]),
            "batch1_p50_ms": _pct(small[name], 0.5),
            "batch1_p95_ms": _pct(small[name], 0.95),
        }
        for name in runners
    }, {"n": len(texts), "repeats": repeats}


def experts_runner(bench: Bench) -> Runner:
    """``fn(batch)`` running the five experts one after another (what one merged pass replaces)."""
    experts = {t: load_any(p, t) for t, p in bench.experts.items()}

    def run(b: Mapping[str, torch.Tensor]) -> None:
        for m in experts.values():
            m(**b)

    return run
