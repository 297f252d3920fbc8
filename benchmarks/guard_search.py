"""Merge search on the guard benchmark (issue: merge search): does a search beat the grid?

    python benchmarks/guard_search.py [--trials 100] [--workers 1] [--only dare_ties_search]

Two searches over the five guard experts (benchmarks/zoo.py, cached), on the same validation
subsets as benchmarks/guard.py's grids (``settings.val_limit`` of guard.json):

- ``dare_ties_search``: HM3's search: TPE over DARE-TIES' density, scaling and seed.
- ``pcb_search``: PCB + ES: CMA-ES over the five per-expert coefficients in [0.5, 3.0], density
  and scaling fixed at the PCB grid's choice (docs/algorithms.md section 2).

Each search uses ``guardmerge.search`` (SQLite study under WORK/search, so a rerun resumes or
reuses a finished study). The grid-chosen counterpart is re-scored on the same validation
subsets by the same scorer, so the comparison is like for like; the best candidate is then
scored on test (``settings.test_limit``). Results go into benchmarks/results/guard.json as
``methods.<name>`` (same shape as the other methods, plus a ``search`` record) and
BENCHMARKS.md is regenerated.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guard import HERE, ROOT, TASKS, Bench

from guardmerge.demo import default_data_dir
from guardmerge.evaluate import mean, normalized, to_json_ready
from guardmerge.search import (
    Candidate,
    MergeScorer,
    SearchJob,
    SearchSettings,
    build_space,
    run_search,
)

log = logging.getLogger("bench.search")

SEARCHES: dict[str, dict[str, Any]] = {
    "dare_ties_search": {"method": "dare_ties", "grid": "dare_ties", "sampler": "tpe", "fixed": [], "weights": None},
    "pcb_search": {
        "method": "pcb",
        "grid": "pcb",
        "sampler": "cmaes",
        "fixed": ["density", "scaling"],
        "weights": (0.5, 3.0),
    },
}


def run_one(name: str, recipe: dict[str, Any], bench: Bench, results: dict, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    grid_entry = results["methods"][recipe["grid"]]
    grid_params = dict(grid_entry["hyperparameters"])
    fixed = {k: grid_params[k] for k in recipe["fixed"]}
    config = bench.config(recipe["method"], fixed)
    tasks = list(bench.experts)
    only = [p for p in ("density", "scaling", "seed") if p not in fixed] if recipe["weights"] is None else []
    space = build_space(
        recipe["method"], fixed, tasks, [1.0] * len(tasks), only=only or [], weight_range=recipe["weights"]
    )
    job = SearchJob(
        config=config,
        data_dir=str(args.data),
        val_limit=args.val_limit,
        work_dir=str(args.work / "search"),
    )
    scorer = MergeScorer(job)
    grid_val = mean(scorer(Candidate(grid_params, (1.0,) * len(tasks)), lambda s, sc: None))
    log.info("%s: grid choice %s scores %.4f on validation", name, grid_params, grid_val)
    settings = SearchSettings(
        trials=args.trials,
        sampler=recipe["sampler"],
        seed=0,
        storage=f"sqlite:///{(args.work / 'search' / f'{name}.db').resolve()}",
        study_name=name,
        resume=True,
        workers=args.workers,
        startup_trials=10,
        log_path=str(args.work / "search" / f"{name}.jsonl"),
    )
    outcome = run_search(space, partial(MergeScorer, job), settings, progress=True, scorer=scorer)
    best = outcome.best
    weights = dict(zip(tasks, best.weights))
    model = bench.merged(bench.config(recipe["method"], best.parameters, weights=weights))
    test = bench.score(model, "test")
    expert_test = results["experts"]
    entry = {
        "test": test,
        "mean_macro_f1": mean({t: v["macro_f1"] for t, v in test.items()}),
        "normalized": mean(normalized(test, expert_test)),
        "normalized_per_task": normalized(test, expert_test),
        "hyperparameters": {**best.parameters, **({"weights": weights} if recipe["weights"] else {})},
        "validation_mean_macro_f1": outcome.best_value,
        "grid_validation_mean_macro_f1": grid_val,
        "grid_hyperparameters": grid_params,
        "search": {
            "trials": sum(outcome.counts.values()),
            "counts": outcome.counts,
            "sampler": recipe["sampler"],
            "seconds_per_trial": outcome.seconds_per_trial,
            "space": outcome.space,
            "workers": args.workers,
            "best_trial": outcome.best_number,
        },
        "seconds": time.perf_counter() - started,
    }
    log.info(
        "%s: validation %.4f (grid %.4f); test mean macro-F1 %.4f, normalised %.4f; %.1f s/trial",
        name,
        outcome.best_value,
        grid_val,
        entry["mean_macro_f1"],
        entry["normalized"],
        outcome.seconds_per_trial,
    )
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "guard.json")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--only", action="append", choices=sorted(SEARCHES))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args.data = args.data or default_data_dir()
    if not args.results.is_file():
        raise SystemExit(f"{args.results} not found: run benchmarks/guard.py first (the grids are the baseline)")
    results = json.loads(args.results.read_text())
    settings = results.get("settings", {})
    args.val_limit = settings.get("val_limit", 300)
    from zoo import build_zoo

    experts = build_zoo(args.data, args.work, list(TASKS), progress=False)
    bench = Bench(args.data, args.work, experts, args.val_limit, settings.get("test_limit"))
    for name in args.only or list(SEARCHES):
        entry = run_one(name, SEARCHES[name], bench, results, args)
        results = json.loads(args.results.read_text())  # another run may have written meanwhile
        results["methods"][name] = entry
        args.results.write_text(json.dumps(to_json_ready(results), indent=2) + "\n")
        log.info("wrote methods.%s to %s", name, args.results)
    from report import write_report

    if args.results.resolve() == (HERE / "results" / "guard.json").resolve():
        write_report(args.results, ROOT / "BENCHMARKS.md", args.results.parent)


if __name__ == "__main__":
    main()
