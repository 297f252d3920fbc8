"""The search loop: planted optima found, SQLite resume, shared storage across workers, Ray."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import optuna
import pytest

from guardmerge.errors import ConfigError
from guardmerge.search import (
    Candidate,
    MergeScorer,
    SearchJob,
    SearchSettings,
    build_space,
    run_search,
)
from tests.search.conftest import TASKS, PlantedScorer, zoo_config


def settings(tmp_path: Path, **over: object) -> SearchSettings:
    base = {"storage": f"sqlite:///{tmp_path / 'study.db'}", "log_path": str(tmp_path / "trials.jsonl")}
    return SearchSettings(**{**base, **over})  # type: ignore[arg-type]


def test_tpe_finds_the_planted_scaling(zoo: dict[str, Path], tmp_path: Path) -> None:
    target = Candidate({"scaling": 0.7}, (1.0, 1.0, 1.0))
    space = build_space("task_arithmetic", {}, TASKS, [1.0] * 3)
    scorer = PlantedScorer(zoo, "task_arithmetic", target)
    out = run_search(space, lambda: scorer, settings(tmp_path, trials=30, seed=1, startup_trials=8), progress=False)
    assert out.best.parameters["scaling"] == pytest.approx(0.7, abs=0.05)
    assert out.best_value > 0.9 and out.counts.get("COMPLETE", 0) + out.counts.get("PRUNED", 0) == 30
    assert out.best_scores == {t: pytest.approx(out.best_value) for t in TASKS}


def test_cmaes_finds_planted_per_expert_weights(zoo: dict[str, Path], tmp_path: Path) -> None:
    """PCB + ES style: only the per-expert coefficients are searched, with CMA-ES."""
    target = Candidate({"scaling": 1.0}, (1.3, 0.4, 0.9))
    space = build_space("task_arithmetic", {"scaling": 1.0}, TASKS, [1.0] * 3, only=[], weight_range=(0.0, 2.0))
    scorer = PlantedScorer(zoo, "task_arithmetic", target)
    out = run_search(
        space, lambda: scorer, settings(tmp_path, trials=60, sampler="cmaes", seed=0, prune=False), progress=False
    )
    assert out.best.weights == pytest.approx(target.weights, abs=0.15)
    assert out.best_value > 0.85


def test_interrupted_study_resumes_its_count_and_keeps_its_best(zoo: dict[str, Path], tmp_path: Path) -> None:
    target = Candidate({"scaling": 0.7}, (1.0, 1.0, 1.0))
    space = build_space("task_arithmetic", {}, TASKS, [1.0] * 3)
    cfg = settings(tmp_path, trials=10, seed=2, prune=False)
    with pytest.raises(KeyboardInterrupt):  # the 5th evaluation is interrupted
        run_search(space, lambda: PlantedScorer(zoo, "task_arithmetic", target, fail_at=5), cfg, progress=False)
    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.storage)
    before = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(before) == 4
    best_before = max(t.value for t in before)
    with pytest.raises(ConfigError, match="--resume"):  # never silently mixed into an old study
        run_search(space, lambda: PlantedScorer(zoo, "task_arithmetic", target), cfg, progress=False)
    resumed = SearchSettings(**{**cfg.__dict__, "resume": True})
    out = run_search(space, lambda: PlantedScorer(zoo, "task_arithmetic", target), resumed, progress=False)
    assert out.counts["COMPLETE"] == 10 and out.counts["FAIL"] == 1
    numbers = [t["number"] for t in out.trials]
    assert numbers == list(range(11))  # the count went on from the interrupted trial
    assert out.best_value >= best_before
    assert all(r["params"] == t.params for r, t in zip(out.trials, before))  # old trials kept
    # the resumed sampler does not replay the first trials' random start-up points
    assert not any(r["params"] == t.params for r in out.trials[5:] for t in before)


def test_a_study_of_another_space_is_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    target = Candidate({"scaling": 0.7}, (1.0, 1.0, 1.0))
    cfg = settings(tmp_path, trials=2, prune=False)
    run_search(
        build_space("task_arithmetic", {}, TASKS, [1.0] * 3),
        lambda: PlantedScorer(zoo, "task_arithmetic", target),
        cfg,
        progress=False,
    )
    other = build_space("ties", {}, TASKS, [1.0] * 3)
    with pytest.raises(ConfigError, match="another space"):
        run_search(
            other,
            lambda: PlantedScorer(zoo, "ties", target),
            SearchSettings(**{**cfg.__dict__, "resume": True}),
            progress=False,
        )


def real_job(search_zoo: dict[str, Path], val_data: Path, tmp_path: Path) -> SearchJob:
    return SearchJob(
        config=zoo_config(search_zoo, method="ties"), data_dir=str(val_data), work_dir=str(tmp_path / "work")
    )


def test_two_worker_processes_share_one_study_and_never_repeat_a_trial(
    search_zoo: dict[str, Path], val_data: Path, tmp_path: Path
) -> None:
    space = build_space("ties", {}, TASKS, [1.0] * 3)
    cfg = settings(tmp_path, trials=8, workers=2, seed=0, startup_trials=4)
    out = run_search(space, partial(MergeScorer, real_job(search_zoo, val_data, tmp_path)), cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    numbers = [r["trial"] for r in log]
    assert len(numbers) == len(set(numbers)) == 8  # every trial evaluated exactly once
    assert len({r["pid"] for r in log}) == 2 and {r["worker"] for r in log} == {0, 1}
    assert sum(out.counts.get(s, 0) for s in ("COMPLETE", "PRUNED")) == 8
    assert out.seconds_per_trial > 0


def test_ray_backend_matches_the_local_backend_for_a_fixed_seed(
    search_zoo: dict[str, Path], val_data: Path, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    space = build_space("ties", {}, TASKS, [1.0] * 3)
    factory = partial(MergeScorer, real_job(search_zoo, val_data, tmp_path))
    local = run_search(space, factory, settings(tmp_path / "local", trials=6, seed=5, startup_trials=3), progress=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_search(
            space,
            factory,
            settings(tmp_path / "ray", trials=6, seed=5, startup_trials=3, ray_address="local"),
            progress=False,
        )
        pids = {t["pid"] for t in map(json.loads, (tmp_path / "ray" / "trials.jsonl").read_text().splitlines())}
    finally:
        ray.shutdown()
    import os

    assert os.getpid() not in pids  # the trials ran in a Ray worker
    assert remote.best == local.best and remote.best_value == pytest.approx(local.best_value)
    assert [t["params"] for t in remote.trials] == [t["params"] for t in local.trials]


def test_pruning_waits_for_half_the_tasks_then_stops_hopeless_trials(zoo: dict[str, Path], tmp_path: Path) -> None:
    """A scorer whose first task is noise and later tasks are the signal: trials are never pruned
    on the first task alone, and hopeless ones are pruned once half the tasks are in."""
    from guardmerge.search.objective import Report

    class Scorer:
        def __call__(self, c: Candidate, report: Report) -> dict[str, float]:
            s = {
                "hate": 1.0 - c.parameters["scaling"],
                "injection": c.parameters["scaling"],
                "sentiment": c.parameters["scaling"],
            }
            scores: dict[str, float] = {}
            for step, t in enumerate(TASKS):
                scores[t] = s[t]
                report(step, scores)
            return scores

    out = run_search(
        build_space("task_arithmetic", {}, TASKS, [1.0] * 3),
        Scorer,
        settings(tmp_path, trials=30, seed=0, startup_trials=5),
        progress=False,
    )
    log = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    pruned = [r for r in log if r["state"] == "PRUNED"]
    assert pruned and all(len(r["scores"]) >= 2 for r in pruned)  # never on the first task alone
    assert out.best.parameters["scaling"] > 1.2  # the signal tasks decide
