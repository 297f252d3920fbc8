"""The guard benchmark: five real guard experts merged into one five-head model.

    python benchmarks/guard.py [--data ../shared/data] [--work benchmarks/.work] [--quick]
    python benchmarks/guard.py --only quality --methods lot,regmean_pp   # one section, some rows

Sections (``--only``, repeatable; default all): quality, speed, frontier, heal, sweep, pairs, seven. A run replaces
the rows and sections it computes in benchmarks/results/guard.json and keeps the others; every
row records the commit and date that produced it (``produced``).

1. Expert zoo (benchmarks/zoo.py, cached): five MiniLM experts fine-tuned from the real base.
2. Quality: every method's hyperparameters are chosen on the validation splits from the small
   grids below (never on test), with and without head alignment (``+align``), then scored on test.
   The ensemble row is the five experts run separately.
3. Speed: texts/s at batch 32 and p50/p95 latency at batch 1, merged five-head model vs the five
   experts one after another, on the same tokenised inputs.
4. Frontier: sharing depth (share_layers K = L, L-1, L-2) on the best single-pass row (by
   validation) as the trunk, branch alignment chosen on validation; quality and measured speed
   against one pass and the five experts.
5. HM3 experiments: self-merging density sweep (TIES, DARE) and two-task merges in both head modes.
6. Heal (``--only heal``, benchmarks/guard_heal.py): label-free distillation from the experts on the
   best training-free row, with and without alignment, with ``train: top`` and at depth K. Every
   row of quality, frontier and heal also carries the fidelity columns (agreement with each
   expert on its own and the other tasks' test texts, flag-rate difference, bootstrap intervals).
7. Seven tasks (``--only seven``): the five guard experts plus a multi-label (goemotions) and a
   token-classification (ner) expert merged into one seven-head model, a few rows chosen on
   validation, with the merged model's throughput against the seven experts.

Writes benchmarks/results/guard.json, then regenerates BENCHMARKS.md and its plots from it
(benchmarks/report.py). No figure is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ siblings: guard_bench, zoo, report

from guard_bench import (
    ALIGN,
    FISHER_EXAMPLES,
    STATS,
    Bench,
    best_row,
    experts_runner,
    grid_points,
    test_scores,
    timings,
)
from guard_heal import HEAL, HEAL_GRID, Fidelity, heal_section, healed
from guard_hm3 import PAIRS, QUICK_PAIRS, density_sweep, two_task
from provenance import environment, produced

from guardmerge.demo import default_data_dir
from guardmerge.evaluate import mean, to_json_ready
from guardmerge.models.multihead import MultiHeadModel, load_any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
log = logging.getLogger("bench")

SOURCES = (
    "benchmarks/guard.py",
    "benchmarks/guard_bench.py",
    "benchmarks/guard_heal.py",
    "benchmarks/guard_hm3.py",
    "benchmarks/zoo.py",
)
"""The benchmark's code: a result is ``-dirty`` when these (or ``src``) have uncommitted changes."""
TASKS = ("hate", "offensive", "emotion", "irony", "injection")

# Small documented grids, chosen on validation (docs/algorithms.md defaults included).
GRIDS: dict[str, dict[str, list[Any]]] = {
    "average": {},
    "task_arithmetic": {"scaling": [0.6, 1.0]},
    "ties": {"density": [0.2], "scaling": [1.0, 1.5]},
    "dare_ties": {"density": [0.5], "scaling": [0.8, 1.0]},
    "pcb": {"density": [0.1], "scaling": [1.0, 1.5]},
    "fisher": {"normalize": [False]},
    "regmean": {"alpha": [0.5, 0.9]},
    "wudi": {"rho": [1.0, 3.0, 10.0], "anchor_scaling": [0.5]},
    "regmean_pp": {"alpha": [0.9], "texts": [150]},
    "lot": {"rho": [0.3, 1.0], "anchor_parameters": [{"scaling": 0.6}], "texts": [150]},
    "lot_wudi": {
        "anchor": ["wudi"],
        "anchor_parameters": [{"rho": 3.0, "anchor_scaling": 0.5}],
        "rho": [1.0],
        "texts": [150],
    },
    "prodistill": {"init_scaling": [0.3], "texts": [64]},
    "prodistill_tensor": {"init_scaling": [0.3], "texts": [64], "granularity": ["tensor"]},
}
ROW_METHOD: dict[str, str] = {"lot_wudi": "lot", "prodistill_tensor": "prodistill"}
"""Rows that are a registered method with other settings (row name -> method)."""
SECTIONS = ("quality", "speed", "frontier", "heal", "sweep", "pairs", "seven")
SEVEN = (*TASKS, "goemotions", "ner")
"""The seven-task merge: the five guard tasks, a multi-label task and a token-classification task."""
SEVEN_GRIDS: dict[str, dict[str, list[Any]]] = {
    "task_arithmetic": {"scaling": [0.3, 0.5]},
    "ties": {"density": [0.2], "scaling": [1.0]},
    "wudi": {"rho": [3.0], "anchor_scaling": [0.3, 0.5]},
}
"""Rows of the seven-task merge (with and without head alignment), each chosen on validation."""
OFFICIAL = {"goemotions": "micro_f1", "ner": "micro_f1"}
"""Tasks whose data README names another headline metric beside macro-F1."""
QUICK_GRIDS: dict[str, dict[str, list[Any]]] = {
    "average": {},
    "task_arithmetic": {"scaling": [0.5]},
    "ties": {"density": [0.2], "scaling": [1.0]},
    "dare_ties": {"density": [0.5], "scaling": [1.0]},
    "pcb": {"density": [0.1], "scaling": [1.0]},
    "fisher": {},
    "regmean": {"alpha": [0.9]},
    "wudi": {"rho": [3.0]},
    "regmean_pp": {"alpha": [0.9], "texts": [60]},
    "lot": {"rho": [1.0], "texts": [60]},
    "lot_wudi": {"anchor": ["wudi"], "rho": [1.0], "texts": [60]},
    "prodistill": {"texts": [16], "epochs": [2]},
    "prodistill_tensor": {"texts": [16], "epochs": [2], "granularity": ["tensor"]},
}
DARE_SEEDS = (0, 1, 2)
SWEEP_DENSITIES = (0.1, 0.3, 0.5, 0.7, 1.0)


def quality(
    bench: Bench,
    grids: Mapping[str, Mapping[str, Sequence[Any]]],
    expert_test: dict,
    seeds: Sequence[int],
    done: Any = None,
    fidelity: Fidelity | None = None,
) -> dict:
    """Grid-search each method (and its +align variant) on validation, score the choice on test
    (with the fidelity columns of the first seed's model when ``fidelity`` is given);
    ``done(name, entry)`` is called as each row is finished (the caller saves it)."""
    out: dict[str, Any] = {}
    for row, grid in grids.items():
        method = ROW_METHOD.get(row, row)
        for align in (False, True):
            name = f"{row}+align" if align else row
            started = time.perf_counter()
            trials: list[dict[str, Any]] = []
            for params in grid_points(grid):
                model = bench.merged(bench.config(method, params, align=align))
                val = bench.score(model, "validation")
                trials.append(
                    {"parameters": params, "validation_mean_macro_f1": mean({t: v["macro_f1"] for t, v in val.items()})}
                )
                log.info("%s %s: validation mean macro-F1 %.4f", name, params, trials[-1]["validation_mean_macro_f1"])
            best = max(trials, key=lambda r: r["validation_mean_macro_f1"])
            run_seeds = seeds if method.startswith("dare") else (0,)
            models = [bench.merged(bench.config(method, best["parameters"], align=align, seed=s)) for s in run_seeds]
            tests = [bench.score(m, "test") for m in models]
            test = {t: {m: statistics.fmean(r[t][m] for r in tests) for m in tests[0][t]} for t in tests[0]}
            entry = {
                "method": method,
                **test_scores(test, expert_test),
                "hyperparameters": best["parameters"],
                "validation_mean_macro_f1": best["validation_mean_macro_f1"],
                "grid": trials,
                **(fidelity.row(models[0], expert_test) if fidelity else {}),
                "seconds": time.perf_counter() - started,
                "produced": produced(*SOURCES),
            }
            if len(tests) > 1:
                entry["seeds"] = list(run_seeds)
                entry["spread"] = {t: statistics.pstdev(r[t]["macro_f1"] for r in tests) for t in test}
                entry["mean_macro_f1_per_seed"] = [mean({t: r[t]["macro_f1"] for t in r}) for r in tests]
            out[name] = entry
            log.info("%s: test mean macro-F1 %.4f, normalised %.4f", name, entry["mean_macro_f1"], entry["normalized"])
            if done is not None:
                done(name, entry)
    return out


def speed(bench: Bench, merged: MultiHeadModel, n_texts: int = 320, repeats: int = 3) -> dict:
    """Merged five-head model vs the five experts one after another, same tokenised inputs."""
    t, settings = timings(
        bench, {"merged": lambda b: merged(**b), "experts": experts_runner(bench)}, merged.tokenizer, n_texts, repeats
    )
    m, e = t["merged"], t["experts"]
    return {
        "batch32": {
            "merged_texts_per_s": m["batch32_texts_per_s"],
            "experts_texts_per_s": e["batch32_texts_per_s"],
            "ratio": m["batch32_texts_per_s"] / e["batch32_texts_per_s"],
        },
        "batch1": {
            "merged_p50_ms": m["batch1_p50_ms"],
            "merged_p95_ms": m["batch1_p95_ms"],
            "experts_p50_ms": e["batch1_p50_ms"],
            "experts_p95_ms": e["batch1_p95_ms"],
            "ratio": e["batch1_p50_ms"] / m["batch1_p50_ms"],
        },
        "texts": settings["n"],
        "repeats": repeats,
    }


def frontier(
    bench: Bench,
    expert_test: dict,
    results: dict,
    depths: Sequence[int],
    row: str | None = None,
    n_texts: int = 320,
    branch_aligns: Sequence[bool] = (True,),
    fidelity: Fidelity | None = None,
) -> dict:
    """Sharing depth: the best single-pass row (by validation) as the trunk, each task's own
    upper blocks from depth K (``share_layers``), with the branch-point alignment (or the best of
    ``branch_aligns`` on validation); quality on test and measured throughput, against one pass
    and the five experts."""
    methods = results.get("methods", {})
    row = row or best_row(results)
    layers = int(load_any(next(iter(bench.experts.values())), "x").config["num_hidden_layers"])
    align = row.endswith("+align")
    if row in methods:
        best = methods[row]
        method, params = best.get("method", row.removesuffix("+align")), best["hyperparameters"]
        model = bench.merged(bench.config(method, params, align=align))
    else:  # a row not scored yet: its grid must hold a single point (nothing to choose)
        name = row.removesuffix("+align")
        points = grid_points(GRIDS[name])
        if len(points) != 1:
            raise SystemExit(f"frontier trunk '{row}' has no quality result and {len(points)} grid points")
        method, params = ROW_METHOD.get(name, name), points[0]
        model = bench.merged(bench.config(method, params, align=align))
        best = {**test_scores(bench.score(model, "test"), expert_test), "produced": produced(*SOURCES)}
    out: dict[str, Any] = {"trunk": row, "method": method, "hyperparameters": params, "layers": layers, "rows": {}}
    models: dict[str, MultiHeadModel] = {f"K={layers}": model}
    out["rows"][f"K={layers}"] = {
        "share_layers": layers,
        "normalized": best["normalized"],
        "worst_task_ratio": best.get("worst_task_ratio"),
        "mean_macro_f1": best["mean_macro_f1"],
        "layer_passes": layers,
        "produced": best.get("produced"),
    }
    n = len(bench.experts)
    for depth in depths:
        trials = []
        for branch_align in branch_aligns:
            cfg = bench.config(method, params, align=align, share_layers=depth, branch_align=branch_align)
            model = bench.merged(cfg)
            val = bench.score(model, "validation")
            trials.append((mean({t: v["macro_f1"] for t, v in val.items()}), branch_align, model))
            log.info("frontier K=%d branch_align=%s: validation %.4f", depth, branch_align, trials[-1][0])
        val_score, branch_align, model = max(trials, key=lambda x: x[0])
        name = f"K={depth}"
        models[name] = model
        out["rows"][name] = {
            "share_layers": depth,
            "branch_align": branch_align,
            "validation_mean_macro_f1": val_score,
            **test_scores(bench.score(model, "test"), expert_test),
            "layer_passes": depth + n * (layers - depth),
            "produced": produced(*SOURCES),
        }
    runners = {name: (lambda b, m=m: m(**b)) for name, m in models.items()} | {"experts": experts_runner(bench)}
    speeds, settings = timings(bench, runners, models[f"K={layers}"].tokenizer, n_texts)
    out["rows"]["experts"] = {
        "share_layers": 0,
        "normalized": 1.0,
        "worst_task_ratio": 1.0,
        "mean_macro_f1": results["experts_mean_macro_f1"],
        "layer_passes": n * layers,
        "note": "the five experts run one after another",
        "produced": produced(*SOURCES),
    }
    for name, r in out["rows"].items():
        r.update(speeds[name])
        if fidelity is not None and name in models:
            r.update(fidelity.row(models[name], expert_test))
        r["compute_vs_one_pass"] = r["layer_passes"] / layers
    out["speed_settings"] = settings
    out["produced"] = produced(*SOURCES)
    return out


def seven_task(
    data: Path,
    work: Path,
    val_limit: int | None,
    test_limit: int | None,
    n_texts: int = 320,
    quick: bool = False,
    heal: dict[str, Any] | None = None,
) -> dict:
    """Five guard tasks + goemotions (multi-label) + ner (token classification) in one model:
    each row's hyperparameters chosen on validation, with and without head alignment; normalised
    macro-F1 per task (entity-type macro-F1 for ner, label macro-F1 for goemotions; their
    micro-F1 beside), the fidelity columns, the best row by validation healed with ``heal``
    settings when given, and the merged model's throughput against the seven experts."""
    from zoo import build_zoo

    experts = build_zoo(data, work, list(SEVEN), progress=False)
    bench = Bench(data, work, experts, val_limit, test_limit)
    expert_test: dict[str, Any] = {}
    for task, folder in experts.items():
        expert_test.update(bench.score(load_any(folder, task), "test", [task]))
    out: dict[str, Any] = {
        "tasks": list(SEVEN),
        "experts": expert_test,
        "experts_mean_macro_f1": mean({t: v["macro_f1"] for t, v in expert_test.items()}),
        "rows": {},
    }
    fidelity = Fidelity(bench)
    best_model, best_val = None, -1.0
    best_setting: tuple[str, dict[str, Any], bool] = ("", {}, False)
    for row, grid in SEVEN_GRIDS.items():
        for align in (False, True):
            name = f"{row}+align" if align else row
            points = grid_points(grid)[:1] if quick else grid_points(grid)
            trials = []
            for params in points:
                model = bench.merged(bench.config(row, params, align=align))
                val = bench.score(model, "validation")
                trials.append((mean({t: v["macro_f1"] for t, v in val.items()}), params, model))
                log.info("seven %s %s: validation mean macro-F1 %.4f", name, params, trials[-1][0])
            val_score, params, model = max(trials, key=lambda x: x[0])
            scores = test_scores(bench.score(model, "test"), expert_test)
            out["rows"][name] = {
                "hyperparameters": params,
                "validation_mean_macro_f1": val_score,
                **scores,
                "official": official(scores["test"], expert_test),
                **fidelity.row(model, expert_test),
                "produced": produced(*SOURCES),
            }
            log.info("seven %s: normalised %.4f, worst %.4f", name, scores["normalized"], scores["worst_task_ratio"])
            if val_score > best_val:
                best_model, best_val, best_setting = model, val_score, (row, params, align)
    assert best_model is not None
    if heal is not None:
        row, params, align = best_setting
        model, report = healed(bench, row, params, align=align, heal=heal)
        scores = test_scores(bench.score(model, "test"), expert_test)
        out["rows"][f"{row}{'+heal+align' if align else '+heal'}"] = {
            "hyperparameters": params,
            **scores,
            "official": official(scores["test"], expert_test),
            **fidelity.row(model, expert_test),
            "heal": report,
            "produced": produced(*SOURCES),
        }
    speeds, settings = timings(
        bench,
        {"merged": lambda b: best_model(**b), "experts": experts_runner(bench)},
        best_model.tokenizer,
        64 if quick else n_texts,
    )
    out["speed"] = {
        **speeds,
        "settings": settings,
        "batch32_ratio": speeds["merged"]["batch32_texts_per_s"] / speeds["experts"]["batch32_texts_per_s"],
        "produced": produced(*SOURCES),
    }
    return out


def official(test: Mapping[str, Any], expert_test: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`OFFICIAL` metric of each task that names one: merged, expert, their ratio."""
    return {
        t: {
            "metric": m,
            "merged": test[t][m],
            "expert": expert_test[t][m],
            "normalized": test[t][m] / expert_test[t][m] if expert_test[t][m] else None,
        }
        for t, m in OFFICIAL.items()
    }


def _save(path: Path, results: dict, started: float) -> None:
    """Write what is done so far (an interrupted run keeps its finished sections)."""
    results["environment"] = environment()
    results["seconds"] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json_ready(results), indent=2) + "\n")


Grids = Mapping[str, Mapping[str, Sequence[Any]]]


def parse_args() -> tuple[argparse.Namespace, Grids]:
    """The command line, and the grids of the quality rows it asks for (``--quick``, ``--methods``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "guard.json")
    ap.add_argument("--quick", action="store_true", help="one grid point per method, capped data (smoke run)")
    ap.add_argument("--val-limit", type=int, default=150, help="validation examples per task for the grids")
    ap.add_argument("--test-limit", type=int, default=1000, help="test examples per task (0: all)")
    ap.add_argument("--sweep-limit", type=int, default=200, help="test examples per task in the density sweep")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        choices=SECTIONS,
        help="run only these sections (repeatable); the others keep their stored results",
    )
    ap.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="skip these sections")
    ap.add_argument(
        "--frontier-row",
        default=None,
        help="quality row used as the trunk of the frontier (default: best validation score)",
    )
    ap.add_argument(
        "--heal-depth", type=int, default=5, help="heal section: the share_layers depth of its frontier row (0: none)"
    )
    ap.add_argument(
        "--heal-texts",
        default=",".join(str(n) for n in HEAL_GRID["texts"]),
        help="heal section: the texts-per-task values tried on validation, comma-separated (each point "
        "trains once; see the heal table's wall times in BENCHMARKS.md)",
    )
    ap.add_argument(
        "--branch-align-choice",
        action="store_true",
        help="frontier: choose branch_align on validation (default: always on)",
    )
    ap.add_argument(
        "--methods", default=None, help=f"quality rows to (re)run, comma-separated (default all: {', '.join(GRIDS)})"
    )
    ap.add_argument(
        "--expert",
        action="append",
        default=[],
        metavar="TASK=FOLDER",
        help="use these experts instead of building the zoo (e.g. your own)",
    )
    args = ap.parse_args()
    grids: Grids = QUICK_GRIDS if args.quick else GRIDS
    if args.methods:
        unknown = sorted(set(args.methods.split(",")) - set(grids))
        if unknown:
            ap.error(f"unknown rows {unknown}; known: {', '.join(grids)}")
        grids = {k: grids[k] for k in args.methods.split(",")}  # in the order given
    return args, grids


def score_experts(bench: Bench, experts: Mapping[str, Path], results: dict[str, Any]) -> dict[str, Any]:
    """Each expert on its own task (test and validation), recorded in ``results``; returns the test scores."""
    expert_val: dict[str, Any] = {}
    expert_test: dict[str, Any] = {}
    for task, folder in experts.items():
        model = load_any(folder, task)
        expert_test.update(bench.score(model, "test", [task]))
        expert_val.update(bench.score(model, "validation", [task]))
    results["experts"] = expert_test
    results["experts_validation"] = expert_val
    results["experts_mean_macro_f1"] = mean({t: v["macro_f1"] for t, v in expert_test.items()})
    results["experts_produced"] = produced(*SOURCES)
    return expert_test


def run_quality(
    bench: Bench,
    grids: Grids,
    expert_test: dict[str, Any],
    results: dict[str, Any],
    out: Path,
    started: float,
    quick: bool,
    fidelity: Fidelity | None = None,
) -> None:
    """The quality section: the ensemble row, then each grid row, saved to ``out`` as it is done."""
    methods = {
        "ensemble": {
            "test": expert_test,
            "mean_macro_f1": results["experts_mean_macro_f1"],
            "normalized": 1.0,
            "worst_task_ratio": 1.0,
            "hyperparameters": {},
            "note": "the five experts run separately",
            "produced": produced(*SOURCES),
        }
    }
    results["methods"] = {**results.get("methods", {}), **methods}
    results["grids"] = {**results.get("grids", {}), **grids}

    def done(name: str, entry: dict) -> None:  # an interrupted run keeps its finished rows
        results["methods"][name] = entry
        _save(out, results, started)

    quality(bench, grids, expert_test, (0,) if quick else DARE_SEEDS, done=done, fidelity=fidelity)


def run_sweep(
    bench: Bench, data: Path, experts: Mapping[str, Path], results: dict[str, Any], args: argparse.Namespace
) -> None:
    """The density-sweep section (on its own test subsets, ``--sweep-limit``)."""
    sweep_bench = bench if args.quick else Bench(data, args.work, experts, args.val_limit, args.sweep_limit)
    sweep_bench.features = bench.features
    expert_sweep = {t: sweep_bench.score(load_any(p, t), "test", [t])[t] for t, p in experts.items()}
    results["density_sweep"] = density_sweep(sweep_bench, expert_sweep, (0.2, 1.0) if args.quick else SWEEP_DENSITIES)
    results["density_sweep_experts"] = expert_sweep
    results["density_sweep_produced"] = produced(*SOURCES)


def finish(args: argparse.Namespace, results: dict[str, Any], started: float, test_limit: int | None) -> None:
    """Write the results with the run's settings, then regenerate the report from them."""
    results["environment"] = environment()
    results["seconds"] = time.perf_counter() - started
    results["settings"] = {
        "val_limit": 60 if args.quick else args.val_limit,
        "test_limit": 100 if args.quick else test_limit,
        "sweep_limit": args.sweep_limit,
        "align": ALIGN,
        "statistics": STATS,
        "fisher_examples": FISHER_EXAMPLES,
        "quick": args.quick,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(to_json_ready(results), indent=2) + "\n")
    log.info("wrote %s in %.0f s", args.out, results["seconds"])
    from report import write_report

    default_out = args.out.resolve() == (HERE / "results" / "guard.json").resolve()
    write_report(args.out, ROOT / "BENCHMARKS.md" if default_out else args.out.with_suffix(".md"), args.out.parent)


def main() -> None:
    args, grids = parse_args()
    run = [x for x in (args.only or SECTIONS) if x not in args.skip]
    test_limit = args.test_limit or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.perf_counter()
    data = args.data or default_data_dir()
    from zoo import build_zoo

    if args.expert:
        experts = {k: Path(v) for k, v in (item.split("=", 1) for item in args.expert)}
    else:
        experts = build_zoo(data, args.work, list(TASKS), progress=False)
    bench = Bench(data, args.work, experts, 60 if args.quick else args.val_limit, 100 if args.quick else test_limit)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    expert_test = score_experts(bench, experts, results)
    fidelity = Fidelity(bench) if {"quality", "frontier", "heal"} & set(run) else None
    if "quality" in run:
        run_quality(bench, grids, expert_test, results, args.out, started, args.quick, fidelity)
    _save(args.out, results, started)
    if "speed" in run:
        merged = bench.merged(bench.config("task_arithmetic", {"scaling": 0.5}))
        results["speed"] = {**speed(bench, merged, n_texts=64 if args.quick else 320), "produced": produced(*SOURCES)}
    _save(args.out, results, started)
    if "frontier" in run:
        results["frontier"] = frontier(
            bench,
            expert_test,
            results,
            (5, 4),
            row=args.frontier_row,
            n_texts=64 if args.quick else 320,
            branch_aligns=(False, True) if args.branch_align_choice else (True,),
            fidelity=fidelity,
        )
    _save(args.out, results, started)
    if "heal" in run:
        assert fidelity is not None
        row = args.frontier_row or best_row(results)
        trunk = {"row": row, **{k: results["methods"][row][k] for k in ("method", "hyperparameters")}}
        results["heal"] = heal_section(
            bench,
            fidelity,
            Fidelity(bench, "validation"),
            expert_test,
            trunk,
            args.heal_depth or None,
            SOURCES,
            args.quick,
            texts=[int(n) for n in args.heal_texts.split(",") if n.strip()],
        )
    _save(args.out, results, started)
    if "sweep" in run:
        run_sweep(bench, data, experts, results, args)
    _save(args.out, results, started)
    if "seven" in run:
        results["seven_task"] = seven_task(
            data,
            args.work,
            60 if args.quick else args.val_limit,
            100 if args.quick else test_limit,
            quick=args.quick,
            heal=(results.get("heal") or {}).get("settings")
            or ({**HEAL, "texts": 60, "epochs": 1} if args.quick else HEAL),
        )
    _save(args.out, results, started)
    if "pairs" in run:
        results["two_task"] = two_task(bench, expert_test, QUICK_PAIRS if args.quick else PAIRS)
        results["two_task_produced"] = produced(*SOURCES)
    finish(args, results, started, test_limit)


if __name__ == "__main__":
    main()
