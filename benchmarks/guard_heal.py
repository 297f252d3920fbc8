"""The guard benchmark's fidelity columns and its heal section (issue 23).

Fidelity (every row): each merged head against its expert on the test texts of every task
(its own task's texts and the others', off-task), by :func:`guardmerge.evaluate.fidelity.compare_logits`:
agreement, flag-rate difference, 95% bootstrap intervals (1,000 draws, seed 0); and the
normalised macro-F1 and worst-task ratio with their intervals, over every task and over the
tasks whose expert reaches 0.5 accuracy on test (the others are flagged ``weak_experts``).

Heal (``--only heal``): label-free distillation from the experts (docs/algorithms.md 3c) on the
best training-free row (by validation), with and without head alignment after it, at the
frontier's depth, and with ``train: top``. Each row records its heal report: steps, held-out
agreement before and after, seconds, peak memory of the process.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from guard_bench import Bench, test_scores
from provenance import produced

from guardmerge.evaluate import mean
from guardmerge.evaluate.bootstrap import macro_f1_scores, normalised_intervals
from guardmerge.evaluate.fidelity import compare_logits, head_logits
from guardmerge.merge.job import MergeJob
from guardmerge.merge.stages import build
from guardmerge.models.multihead import MultiHeadModel, load_any

log = logging.getLogger("bench")

WEAK_ACCURACY = 0.5
"""An expert below this test accuracy is flagged: a merge drifting to the majority class can beat it."""
HEAL = {"texts": 600, "epochs": 2, "learning_rate": 3e-5, "batch_size": 32, "max_length": 128}
"""The heal settings of the benchmark rows (the ``heal:`` defaults of docs/algorithms.md 3c)."""
HEAL_GRID: dict[str, list[Any]] = {"texts": [2000, 4000]}
"""Heal settings chosen on validation (mean agreement with the experts on the validation texts)."""


class Fidelity:
    """The experts' logits on every task's texts of one split, computed once; then each row's
    fidelity report from one pass of the merged model over the same texts."""

    def __init__(self, bench: Bench, split: str = "test") -> None:
        data = bench.test if split == "test" else bench.val
        self.tasks = list(bench.experts)
        self.data = {t: data[t] for t in self.tasks}
        self.texts = {t: list(d.texts) for t, d in self.data.items()}
        self.pool = [x for t in self.tasks for x in self.texts[t]]
        self.theirs: dict[str, np.ndarray] = {}
        self.kinds: dict[str, str] = {}
        for task, folder in bench.experts.items():
            expert = load_any(folder, task)
            head = expert.tasks[0]
            self.theirs[task] = head_logits(expert, self.pool, [head])[head]
            self.kinds[task] = expert.kind(head).name
        self.offsets = np.cumsum([0] + [len(self.texts[t]) for t in self.tasks])

    def own(self, task: str, logits: np.ndarray) -> np.ndarray:
        """The rows of ``logits`` (``[N, ...]`` over the pool) on ``task``'s own texts."""
        k = self.tasks.index(task)
        return logits[self.offsets[k] : self.offsets[k + 1]]

    def row(self, model: MultiHeadModel, expert_test: Mapping[str, Any]) -> dict[str, Any]:
        """``fidelity`` (per head), ``intervals`` (every task), ``intervals_strong`` (without the
        weak experts), ``weak_experts`` and the mean agreements of ``model``."""
        mine = head_logits(model, self.pool, self.tasks)
        fid = compare_logits(model, self.texts, mine, self.theirs)
        scores = {}
        for task in self.tasks:
            if self.kinds[task] != "single_label" or self.data[task].labels is None:
                continue  # multi-label and token tasks: scored by evaluate, without intervals
            classes = len(model.labels(task))
            pred = self.own(task, mine[task]).argmax(-1)
            ref = self.own(task, self.theirs[task]).argmax(-1)
            scores[task] = macro_f1_scores(list(self.data[task].labels or []), pred, ref, classes)
        weak = sorted(t for t in scores if expert_test[t].get("accuracy", 1.0) < WEAK_ACCURACY)
        strong = {t: s for t, s in scores.items() if t not in weak}
        return {
            "fidelity": fid,
            "agreement": {t: fid[t]["agreement"] for t in self.tasks},
            "off_task_agreement": {t: fid[t].get("off_task_agreement") for t in self.tasks},
            "min_agreement": min(min(fid[t]["agreement"], fid[t].get("off_task_agreement", 1.0)) for t in self.tasks),
            "intervals": normalised_intervals(scores),
            "intervals_strong": normalised_intervals(strong) if weak else None,
            "weak_experts": weak,
            "interval_tasks": sorted(scores),
        }


def _peak_mb() -> float:
    """The process's peak resident memory so far (MB; ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def healed(
    bench: Bench, method: str, params: Mapping[str, Any], *, align: bool, **extra: Any
) -> tuple[MultiHeadModel, dict]:
    """A merge with ``heal`` (``extra`` holds ``heal=`` and any other config fields), and its
    heal report with wall time and the process's peak memory after it."""
    cfg = bench.config(method, params, align=align, **extra)
    started = time.perf_counter()
    result = build(MergeJob.of(cfg), progress=False, feature_cache=bench.features)
    report = dict(result.info.get("heal", {}))
    report.pop("history", None)
    report["merge_and_heal_seconds"] = time.perf_counter() - started
    report["peak_rss_mb_after"] = _peak_mb()
    return result.to_model(), report


def heal_section(
    bench: Bench,
    fidelity: Fidelity,
    val_fidelity: Fidelity,
    expert_test: Mapping[str, Any],
    trunk: Mapping[str, Any],
    depth: int | None,
    sources: Sequence[str],
    quick: bool = False,
    texts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The heal rows on ``trunk`` (``{"row", "method", "hyperparameters"}``): heal settings chosen
    on validation by mean agreement among ``texts`` per task (default :data:`HEAL_GRID`), then
    +heal, +heal+align, +heal with train: top (+align), and +heal at ``depth`` (share_layers,
    branch alignment on) when given."""
    method, params = trunk["method"], trunk["hyperparameters"]
    sizes = list(texts or HEAL_GRID["texts"])
    grid = [{"texts": 60, "epochs": 1}] if quick else [{"texts": n} for n in sizes]
    trials, trained = [], {}
    for point in grid:
        heal = {**HEAL, **point}
        model, report = healed(bench, method, params, align=False, heal=heal)
        trained[repr(sorted(heal.items()))] = (model, report)  # the +heal row of the chosen point
        val = val_fidelity.row(model, expert_test)
        score = mean({t: min(v, val["off_task_agreement"][t] or v) for t, v in val["agreement"].items()})
        trials.append({"heal": heal, "validation_mean_agreement": score, "seconds": report["seconds"]})
        log.info("heal %s: validation mean agreement %.4f (%.0f s)", point, score, report["seconds"])
    chosen = max(trials, key=lambda r: r["validation_mean_agreement"])["heal"]
    variants: dict[str, dict[str, Any]] = {
        "+heal": {"heal": chosen},
        "+heal+align": {"heal": chosen, "align": True},
        "+heal(top)+align": {"heal": {**chosen, "train": "top"}, "align": True},
    }
    if depth is not None:
        variants[f"+heal K={depth}"] = {"heal": chosen, "align": True, "share_layers": depth, "branch_align": True}
    layers = int(load_any(next(iter(bench.experts.values())), "x").config["num_hidden_layers"])
    rows: dict[str, Any] = {}
    for suffix, extra in variants.items():
        align = bool(extra.pop("align", False))
        again = trained.get(repr(sorted(extra["heal"].items()))) if set(extra) == {"heal"} and not align else None
        model, report = again or healed(bench, method, params, align=align, **extra)
        k = int(extra.get("share_layers", layers))
        rows[f"{trunk['row'].removesuffix('+align')}{suffix}"] = {
            **test_scores(bench.score(model, "test"), dict(expert_test)),
            **fidelity.row(model, expert_test),
            "heal": report,
            "share_layers": k,
            "compute_vs_one_pass": (k + len(bench.experts) * (layers - k)) / layers,
            "produced": produced(*sources),
        }
        last = rows[list(rows)[-1]]
        log.info("%s: normalised %.4f, min agreement %.4f", suffix, last["normalized"], last["min_agreement"])
    return {
        "trunk": dict(trunk),
        "validation": trials,
        "settings": chosen,
        "rows": rows,
        "produced": produced(*sources),
    }
