"""The guard benchmark: five real guard experts merged into one five-head model.

    python benchmarks/guard.py [--data ../shared/data] [--work benchmarks/.work] [--quick]

1. Expert zoo (benchmarks/zoo.py, cached): five MiniLM experts fine-tuned from the real base.
2. Quality: every method's hyperparameters are chosen on the validation splits from the small
   grids below (never on test), with and without head alignment (``+align``), then scored on test.
   The ensemble row is the five experts run separately.
3. Speed: texts/s at batch 32 and p50/p95 latency at batch 1, merged five-head model vs the five
   experts one after another, on the same tokenised inputs.
4. HM3 experiments: self-merging density sweep (TIES, DARE) and two-task merges in both head modes.

Writes benchmarks/results/guard.json, then regenerates BENCHMARKS.md and its plots from it
(benchmarks/report.py). No figure is typed by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ siblings: zoo, report

import guardmerge
from guardmerge.config import MergeConfig, parse_config
from guardmerge.data import TaskData, load_task
from guardmerge.demo import base_checkpoint, default_data_dir
from guardmerge.evaluate import evaluate, mean, normalized, to_json_ready
from guardmerge.multihead import MultiHeadModel, load_any
from guardmerge.pipeline import build, expert_statistics, self_merge_config
from guardmerge.refit import FeatureCache

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
log = logging.getLogger("bench")

TASKS = ("hate", "offensive", "emotion", "irony", "injection")
ALIGN = {"method": "lstsq", "examples": 400}
STATS = {"examples": 1000, "max_length": 128, "batch_size": 32}
FISHER_EXAMPLES = 256

# Small documented grids, chosen on validation (ALGORITHMS.md defaults included).
GRIDS: dict[str, dict[str, list[Any]]] = {
    "average": {},
    "task_arithmetic": {"scaling": [0.3, 0.6, 1.0]},
    "ties": {"density": [0.2], "scaling": [1.0, 1.5]},
    "dare_ties": {"density": [0.5], "scaling": [0.8, 1.0]},
    "pcb": {"density": [0.1], "scaling": [1.0, 1.5]},
    "fisher": {"normalize": [False]},
    "regmean": {"alpha": [0.5, 0.9]},
}
QUICK_GRIDS: dict[str, dict[str, list[Any]]] = {
    "average": {},
    "task_arithmetic": {"scaling": [0.5]},
    "ties": {"density": [0.2], "scaling": [1.0]},
    "dare_ties": {"density": [0.5], "scaling": [1.0]},
    "pcb": {"density": [0.1], "scaling": [1.0]},
    "fisher": {},
    "regmean": {"alpha": [0.9]},
}
DARE_SEEDS = (0, 1, 2)
SWEEP_DENSITIES = (0.1, 0.3, 0.5, 0.7, 1.0)
PAIRS = (("injection", "hate"), ("emotion", "irony"))
QUICK_PAIRS = (("injection", "emotion"),)


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


class Bench:
    """Shared state: experts, data, cached statistics and expert features."""

    def __init__(self, data: Path, work: Path, experts: Mapping[str, Path], val_limit: int | None, test_limit: int | None):
        self.base = str(base_checkpoint())
        self.experts = dict(experts)
        self.tasks: dict[str, TaskData] = {t: load_task(data / t) for t in experts}
        self.val = {t: td.split("validation", val_limit) for t, td in self.tasks.items()}
        self.test = {t: td.split("test", test_limit) for t, td in self.tasks.items()}
        self.features = FeatureCache(work / "features")
        self.stats_cache: dict[str, Any] = {}
        self.work = work

    def config(self, method: str, params: Mapping[str, Any], *, tasks: Sequence[str] | None = None,
               align: bool = False, heads: str = "multi", seed: int = 0,
               weights: Mapping[str, float] | None = None) -> MergeConfig:
        chosen = list(tasks or self.experts)
        return parse_config({
            "base_model": self.base,
            "experts": [{"model": str(self.experts[t]), "task": t, "weight": (weights or {}).get(t, 1.0),
                         "data": str(self.tasks[t].folder / "train.jsonl")} for t in chosen],
            "method": method, "parameters": dict(params), "heads": heads, "seed": seed,
            "align_heads": ALIGN if align else False,
            "statistics": {**STATS, "examples": FISHER_EXAMPLES if method == "fisher" else STATS["examples"]},
        }, source=f"{method} {dict(params)}")

    def merged(self, cfg: MergeConfig) -> MultiHeadModel:
        from guardmerge.methods import METHODS

        needs = METHODS.get(cfg.method).needs
        stats = None
        if needs:
            key = f"{'+'.join(sorted(needs))}:{','.join(e.task for e in cfg.experts)}"
            if key not in self.stats_cache:
                self.stats_cache[key] = expert_statistics(cfg, needs, progress=False, cache=self.work / "stats")
            stats = self.stats_cache[key]
        return build(cfg, progress=False, stats=stats, feature_cache=self.features).to_model()

    def score(self, model: MultiHeadModel, split: str, tasks: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        data = self.val if split == "validation" else self.test
        return evaluate(model, {t: data[t] for t in (tasks or model.tasks)})


def quality(bench: Bench, grids: Mapping[str, Mapping[str, Sequence[Any]]], expert_test: dict, seeds: Sequence[int]) -> dict:
    """Grid-search each method (and its +align variant) on validation, score the choice on test."""
    out: dict[str, Any] = {}
    for method, grid in grids.items():
        for align in (False, True):
            name = f"{method}+align" if align else method
            started = time.perf_counter()
            trials = []
            for params in grid_points(grid):
                model = bench.merged(bench.config(method, params, align=align))
                val = bench.score(model, "validation")
                trials.append({"parameters": params, "validation_mean_macro_f1": mean({t: v["macro_f1"] for t, v in val.items()})})
                log.info("%s %s: validation mean macro-F1 %.4f", name, params, trials[-1]["validation_mean_macro_f1"])
            best = max(trials, key=lambda r: r["validation_mean_macro_f1"])
            run_seeds = seeds if method.startswith("dare") else (0,)
            tests = [bench.score(bench.merged(bench.config(method, best["parameters"], align=align, seed=s)), "test")
                     for s in run_seeds]
            test = {t: {m: statistics.fmean(r[t][m] for r in tests) for m in tests[0][t]} for t in tests[0]}
            entry = {
                "test": test,
                "mean_macro_f1": mean({t: v["macro_f1"] for t, v in test.items()}),
                "normalized": mean(normalized(test, expert_test)),
                "normalized_per_task": normalized(test, expert_test),
                "hyperparameters": best["parameters"],
                "validation_mean_macro_f1": best["validation_mean_macro_f1"],
                "grid": trials,
                "seconds": time.perf_counter() - started,
            }
            if len(tests) > 1:
                entry["seeds"] = list(run_seeds)
                entry["spread"] = {t: statistics.pstdev(r[t]["macro_f1"] for r in tests) for t in test}
                entry["mean_macro_f1_per_seed"] = [mean({t: r[t]["macro_f1"] for t in r}) for r in tests]
            out[name] = entry
            log.info("%s: test mean macro-F1 %.4f, normalised %.4f", name, entry["mean_macro_f1"], entry["normalized"])
    return out


def _latencies(fn, batches: Sequence[Mapping[str, torch.Tensor]], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        for b in batches:
            t0 = time.perf_counter()
            fn(b)
            times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def speed(bench: Bench, merged: MultiHeadModel, n_texts: int = 256, repeats: int = 3) -> dict:
    """Merged five-head model vs the five experts one after another, same tokenised inputs."""
    experts = {t: load_any(p, t) for t, p in bench.experts.items()}
    texts = [t for task in bench.tasks for t in bench.test[task].texts[: n_texts // len(bench.tasks)]]
    tok = merged.tokenizer

    def batches(size: int) -> list[dict[str, torch.Tensor]]:
        return [dict(tok(texts[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, len(texts), size)]

    def run_merged(b: Mapping[str, torch.Tensor]) -> None:
        merged(**b)

    def run_experts(b: Mapping[str, torch.Tensor]) -> None:
        for m in experts.values():
            m(**b)

    out: dict[str, Any] = {}
    b32 = batches(32)
    for fn in (run_merged, run_experts):  # warm up
        fn(b32[0])
    m32 = statistics.median(sum(_latencies(run_merged, b32, 1)) for _ in range(repeats))
    e32 = statistics.median(sum(_latencies(run_experts, b32, 1)) for _ in range(repeats))
    out["batch32"] = {"merged_texts_per_s": len(texts) / m32, "experts_texts_per_s": len(texts) / e32, "ratio": e32 / m32}
    b1 = batches(1)[:64]
    lm = sorted(_latencies(run_merged, b1, repeats))
    le = sorted(_latencies(run_experts, b1, repeats))

    def pct(xs: list[float], q: float) -> float:
        return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]

    out["batch1"] = {
        "merged_p50_ms": pct(lm, 0.5), "merged_p95_ms": pct(lm, 0.95),
        "experts_p50_ms": pct(le, 0.5), "experts_p95_ms": pct(le, 0.95),
        "ratio": pct(le, 0.5) / pct(lm, 0.5),
    }
    out["texts"] = len(texts)
    out["repeats"] = repeats
    return out


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


def _save(path: Path, results: dict, started: float) -> None:
    """Write what is done so far (an interrupted run keeps its finished sections)."""
    results["environment"] = environment()
    results["seconds"] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json_ready(results), indent=2) + "\n")


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "guardmerge": guardmerge.__version__, "commit": commit, "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "guard.json")
    ap.add_argument("--quick", action="store_true", help="one grid point per method, capped data (smoke run)")
    ap.add_argument("--val-limit", type=int, default=300, help="validation examples per task for the grids")
    ap.add_argument("--test-limit", type=int, default=None, help="test examples per task (default: all)")
    ap.add_argument("--sweep-limit", type=int, default=500, help="test examples per task in the density sweep")
    ap.add_argument("--skip", action="append", default=[], choices=["quality", "speed", "sweep", "pairs"])
    ap.add_argument("--expert", action="append", default=[], metavar="TASK=FOLDER",
                    help="use these experts instead of building the zoo (e.g. your own)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.perf_counter()
    data = args.data or default_data_dir()
    from zoo import build_zoo

    if args.expert:
        experts = {k: Path(v) for k, v in (item.split("=", 1) for item in args.expert)}
    else:
        experts = build_zoo(data, args.work, progress=False)
    bench = Bench(data, args.work, experts, 60 if args.quick else args.val_limit, 100 if args.quick else args.test_limit)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    expert_val, expert_test = {}, {}
    for task, folder in experts.items():
        model = load_any(folder, task)
        expert_test.update(bench.score(model, "test", [task]))
        expert_val.update(bench.score(model, "validation", [task]))
    results["experts"] = expert_test
    results["experts_validation"] = expert_val
    results["experts_mean_macro_f1"] = mean({t: v["macro_f1"] for t, v in expert_test.items()})
    if "quality" not in args.skip:
        methods = {"ensemble": {"test": expert_test, "mean_macro_f1": results["experts_mean_macro_f1"],
                                "normalized": 1.0, "hyperparameters": {}, "note": "the five experts run separately"}}
        methods.update(quality(bench, QUICK_GRIDS if args.quick else GRIDS, expert_test, (0,) if args.quick else DARE_SEEDS))
        results["methods"] = {**results.get("methods", {}), **methods}
        results["grids"] = QUICK_GRIDS if args.quick else GRIDS
    _save(args.out, results, started)
    if "speed" not in args.skip:
        merged = bench.merged(bench.config("task_arithmetic", {"scaling": 0.5}))
        results["speed"] = speed(bench, merged, n_texts=64 if args.quick else 320)
    _save(args.out, results, started)
    if "sweep" not in args.skip:
        sweep_bench = bench if args.quick else Bench(data, args.work, experts, args.val_limit, args.sweep_limit)
        sweep_bench.features = bench.features
        expert_sweep = {t: sweep_bench.score(load_any(p, t), "test", [t])[t] for t, p in experts.items()}
        results["density_sweep"] = density_sweep(sweep_bench, expert_sweep, (0.2, 1.0) if args.quick else SWEEP_DENSITIES)
        results["density_sweep_experts"] = expert_sweep
    _save(args.out, results, started)
    if "pairs" not in args.skip:
        results["two_task"] = two_task(bench, expert_test, QUICK_PAIRS if args.quick else PAIRS)
    results["environment"] = environment()
    results["seconds"] = time.perf_counter() - started
    results["settings"] = {"val_limit": 60 if args.quick else args.val_limit,
                           "test_limit": 100 if args.quick else args.test_limit, "sweep_limit": args.sweep_limit, "align": ALIGN,
                           "statistics": STATS, "fisher_examples": FISHER_EXAMPLES, "quick": args.quick}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(to_json_ready(results), indent=2) + "\n")
    log.info("wrote %s in %.0f s", args.out, results["seconds"])
    from report import write_report

    default_out = args.out.resolve() == (HERE / "results" / "guard.json").resolve()
    write_report(args.out, ROOT / "BENCHMARKS.md" if default_out else args.out.with_suffix(".md"), args.out.parent)


if __name__ == "__main__":
    main()
