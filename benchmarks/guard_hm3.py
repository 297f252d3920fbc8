"""The guard benchmark's HM3 experiments (benchmarks/guard.py sections ``sweep`` and ``pairs``):
self-merging density sweeps and two-task merges in both head modes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from guard_bench import Bench

from guardmerge.evaluate import mean
from guardmerge.merge.stages import self_merge_config

log = logging.getLogger("bench")

PAIRS = (("injection", "hate"), ("emotion", "irony"))
QUICK_PAIRS = (("injection", "emotion"),)


def density_sweep(bench: Bench, expert_test: dict, densities: Sequence[float]) -> dict:
    """HM3 self-merging: each expert merged with itself at each density (TIES, DARE)."""
    out: dict[str, Any] = {}
    for method in ("ties", "dare_linear"):
        out[method] = {}
        for task, folder in bench.experts.items():
            curve = []
            for d in densities:
                params = {"density": d, "scaling": 1.0}
                model = bench.merged(self_merge_config(bench.base, str(folder), method, params, task=task))
                f1 = bench.score(model, "test", [task])[task]["macro_f1"]
                curve.append({"density": d, "macro_f1": f1, "normalized": f1 / expert_test[task]["macro_f1"]})
            out[method][task] = curve
            log.info("self-merge %s %s: %s", method, task, [round(c["macro_f1"], 3) for c in curve])
    return out


def two_task(bench: Bench, expert_test: dict, pairs: Sequence[Sequence[str]] = PAIRS) -> dict:
    """HM3's two-task merges in both head modes (TIES, paper defaults; task arithmetic 0.5)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if not all(t in bench.experts for t in pair):
            continue
        key = "+".join(pair)
        out[key] = {"sources_mean_macro_f1": mean({t: expert_test[t]["macro_f1"] for t in pair})}
        for heads in ("multi", "hm3"):
            for method, params in (("ties", {"density": 0.2, "scaling": 1.0}), ("task_arithmetic", {"scaling": 0.5})):
                model = bench.merged(bench.config(method, params, tasks=pair, heads=heads))
                test = bench.score(model, "test", pair)
                out[key][f"{method}/{heads}"] = {
                    "test": {t: test[t]["macro_f1"] for t in pair},
                    "mean_macro_f1": mean({t: test[t]["macro_f1"] for t in pair}),
                }
    return out
