"""``guardmerge plan`` on the five real guard experts (issue 23, section 3): the cheapest plan
whose every head agrees with its expert at the floor, checked on test.

    python benchmarks/guard_plan.py [--min-agreement 0.97] [--max-compute 1.5] [--trials 8]
                                    [--methods wudi] [--heal off,top] [--val-limit 100]

The config is the guard benchmark's best training-free trunk (``heal.trunk`` of
benchmarks/results/guard.json, default wudi rho 10, anchor scaling 0.5) with head alignment, every
expert's ``data:`` its train split (heal reads its texts, never its labels) and the heal settings
the guard benchmark's heal section chose on validation (``heal.settings`` of guard.json; else
guard_heal.HEAL). The planner (:func:`guardmerge.search.plan.plan_to_folder`) scores
each plan on the first ``--val-limit`` validation texts of every task (own and off-task agreement)
and writes the chosen model; this script then scores that model on the full test splits with the
guard benchmark's fidelity columns (agreement with each expert on its own and the other tasks'
texts, normalised macro-F1 with its 95% bootstrap interval).

Writes benchmarks/results/plan.json (with the commit and date that produced it); the study
resumes from WORK/plan/chosen.plan/ when rerun with the same settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guard import HERE, SOURCES, TASKS, score_experts
from guard_bench import Bench, test_scores
from guard_heal import HEAL, Fidelity
from provenance import environment, produced

from guardmerge.config import parse_config
from guardmerge.demo import default_data_dir
from guardmerge.models.multihead import MultiHeadModel
from guardmerge.search import SearchSettings
from guardmerge.search.plan import plan_to_folder

log = logging.getLogger("bench.plan")

TRUNK: dict[str, Any] = {"method": "wudi", "hyperparameters": {"rho": 10.0, "anchor_scaling": 0.5}}
"""The trunk when guard.json has no heal section (the best single-pass row of the last quality run)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "plan.json")
    ap.add_argument("--min-agreement", type=float, default=0.97)
    ap.add_argument("--max-compute", type=float, default=1.5)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--methods", default=None, help="comma-separated (default: the trunk's method)")
    ap.add_argument("--heal", default="off,top")
    ap.add_argument("--val-limit", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub", "optuna"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.perf_counter()
    provenance = produced(*SOURCES, "benchmarks/guard_plan.py")  # the code the plan runs, as it starts
    data = args.data or default_data_dir()
    from zoo import build_zoo

    experts = build_zoo(data, args.work, list(TASKS), progress=False)
    bench = Bench(data, args.work, experts, args.val_limit, None)
    guard_json = HERE / "results" / "guard.json"
    stored = json.loads(guard_json.read_text()) if guard_json.is_file() else {}
    trunk: dict[str, Any] = {k: v for k, v in (stored.get("heal", {}).get("trunk") or TRUNK).items() if k != "row"}
    cfg = bench.config(trunk["method"], trunk["hyperparameters"], align=True)
    heal_settings = dict(stored.get("heal", {}).get("settings") or HEAL)
    cfg = parse_config({**cfg.model_dump(), "heal": heal_settings}, source="guard_plan")
    out = args.work / "plan" / "chosen"
    summary = plan_to_folder(
        cfg,
        data,
        out,
        SearchSettings(trials=args.trials, sampler="tpe", seed=0, startup_trials=min(4, args.trials), resume=True),
        min_agreement=args.min_agreement,
        max_compute=args.max_compute,
        methods=args.methods.split(",") if args.methods else None,
        heal=args.heal.split(","),
        val_limit=args.val_limit,
        force=True,
        progress=False,
    )
    plan_seconds = time.perf_counter() - started
    log.info("every scored plan:\n%s", summary["frontier_table"])
    expert_test = score_experts(bench, experts, {})
    model = MultiHeadModel.from_pretrained(out)
    fidelity = Fidelity(bench)
    row = {**test_scores(bench.score(model, "test"), expert_test), **fidelity.row(model, expert_test)}
    result: dict[str, Any] = {
        "settings": {
            "trunk": trunk,
            "min_agreement": args.min_agreement,
            "max_compute": args.max_compute,
            "trials": args.trials,
            "methods": args.methods,
            "heal": args.heal,
            "heal_settings": heal_settings,
            "val_limit": args.val_limit,
        },
        "plan": {k: v for k, v in summary.items() if k != "frontier_table"},
        "test": row,
        "meets_floor_on_test": bool(row["min_agreement"] >= args.min_agreement),
        "seconds": plan_seconds,
        "environment": environment(),
        "produced": provenance,
    }
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log.info(
        "chosen %s: compute %.3f, validation min agreement %.4f, test min agreement %.4f (%.0f s)",
        summary["chosen"]["plan"],
        summary["chosen"]["compute"],
        summary["chosen"]["min_agreement"],
        row["min_agreement"],
        plan_seconds,
    )


if __name__ == "__main__":
    main()
