"""Running a search: an Optuna study in a real database, local workers or a Ray cluster.

Trials live in the study's storage (a SQLite file by default, or any database URL Optuna
supports), so an interrupted search resumes where it stopped and several workers (processes on
this machine, or Ray tasks on a cluster) share one study: the storage hands every trial number
out once. The remaining trial budget is split between the workers up front, so a search stops at
exactly ``trials`` finished trials (complete or pruned).

Samplers: TPE (HM3 searched DARE-TIES this way), CMA-ES (PCB + ES, docs/algorithms.md section 2) and
random. Pruning: the median rule after each task, from the point where half the tasks are scored,
on the objective with unscored tasks counted as 0 (the worst-task objective is not pruned).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from guardmerge.errors import ConfigError, GuardmergeError
from guardmerge.search.objective import Objective, Scorer, aggregate
from guardmerge.search.space import Candidate, Space

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

SamplerName = Literal["tpe", "cmaes", "random"]
ScorerFactory = Callable[[], Scorer]
"""Builds a worker's scorer (picklable for worker processes, e.g. ``partial(MergeScorer, job)``)."""


@dataclass(frozen=True)
class SearchSettings:
    """How to search.

    Attributes:
        trials: finished trials (complete or pruned) the study should hold at the end.
        sampler: ``tpe``, ``cmaes`` or ``random``.
        seed: sampler seed (worker ``i`` uses ``seed + i``).
        storage: Optuna storage URL, e.g. ``sqlite:///search.db`` or a PostgreSQL URL.
        study_name: the study's name in the storage.
        resume: continue an existing study (else an existing study with trials is refused).
        workers: parallel workers (processes here, or Ray tasks with ``ray_address``).
        ray_address: run the workers as Ray tasks on this cluster (``local`` starts one here).
        prune: stop hopeless trials early (median rule after each task, once half are scored).
        startup_trials: trials before TPE models the space and before pruning starts.
        objective, task_weights: see :func:`~guardmerge.search.objective.aggregate`.
        log_path: JSONL file, one line per evaluated trial (appended by every worker).
        value: a trial's value from its candidate and scores, instead of ``objective`` (picklable;
            ``guardmerge plan``'s); such a study is not pruned.
    """

    trials: int = 100
    sampler: SamplerName = "tpe"
    seed: int = 0
    storage: str = "sqlite:///guardmerge-search.db"
    study_name: str = "guardmerge"
    resume: bool = False
    workers: int = 1
    ray_address: str | None = None
    prune: bool = True
    startup_trials: int = 10
    objective: Objective = "mean"
    task_weights: dict[str, float] = field(default_factory=dict)
    log_path: str | None = None
    value: Callable[[Candidate, Mapping[str, float]], float] | None = None


@dataclass
class SearchOutcome:
    """What a search found.

    Attributes:
        best: the best candidate; best_value its objective; best_scores its per-task scores.
        best_number: its trial number.
        trials: every trial (number, state, value, params, scores, seconds, worker).
        seconds_per_trial: median wall time of a finished trial.
        counts: trials per state (``COMPLETE``, ``PRUNED``, ``FAIL``...).
        space: the searched space (JSON-ready).
        settings: sampler, seed, objective, workers, storage.
    """

    best: Candidate
    best_value: float
    best_scores: dict[str, float]
    best_number: int
    trials: list[dict[str, Any]]
    seconds_per_trial: float
    counts: dict[str, int]
    space: dict[str, Any]
    settings: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (written as ``search.json`` next to the best merge)."""
        return {
            "best": {
                "trial": self.best_number,
                "value": self.best_value,
                "parameters": self.best.parameters,
                "weights": list(self.best.weights),
                "scores": self.best_scores,
            },
            "seconds_per_trial": self.seconds_per_trial,
            "counts": self.counts,
            "space": self.space,
            "settings": self.settings,
            "trials": self.trials,
        }


# --------------------------------------------------------------------------------- storage


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url``; SQLite files get a generous lock timeout (several
    processes write to them) and their folder is created."""
    import optuna

    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    return optuna.storages.RDBStorage(url) if "://" in url else url


RESUME_SEED_STEP = 7919
"""Sampler seed = ``seed + worker + RESUME_SEED_STEP * trials already in the study``."""


def make_sampler(name: SamplerName, seed: int, startup: int, parallel: bool) -> optuna.samplers.BaseSampler:
    """The sampler named ``name``, seeded."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=parallel
        )
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise GuardmergeError(
                "the CMA-ES sampler needs the cmaes package: pip install 'guardmerge[search]'"
            ) from None
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=min(startup, 5), warn_independent_sampling=False
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler '{name}'; choose tpe, cmaes or random")


def _pruner(settings: SearchSettings, n_tasks: int) -> optuna.pruners.BasePruner:
    """The median rule, applied once at least half the tasks are scored: one task's score alone
    predicts the mean poorly (a weak expert's task often moves against the others)."""
    import optuna

    if not settings.prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=settings.startup_trials, n_warmup_steps=max(0, (n_tasks + 1) // 2 - 1)
    )


def _finished(study: optuna.Study) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def prepare_study(space: Space, settings: SearchSettings) -> optuna.Study:
    """Create the study, or reopen it to resume (checking that it searched the same space)."""
    import optuna

    _quiet_optuna()
    storage = open_storage(settings.storage)
    names = optuna.study.get_all_study_names(storage)
    exists = settings.study_name in names
    if exists and not settings.resume:
        study = optuna.load_study(study_name=settings.study_name, storage=storage)
        if study.trials:
            raise ConfigError(
                f"study '{settings.study_name}' in {settings.storage} already holds {len(study.trials)} "
                "trials: pass --resume to continue it, or another --study-name / --storage"
            )
    if settings.resume and not exists:
        log.warning("no study '%s' in %s to resume; starting a new one", settings.study_name, settings.storage)
    study = optuna.create_study(
        study_name=settings.study_name, storage=storage, direction="maximize", load_if_exists=True
    )
    described = json.loads(json.dumps(space.describe()))
    stored = study.user_attrs.get("space")
    if stored is None:
        study.set_user_attr("space", described)
    elif stored != described:
        raise ConfigError(
            f"study '{settings.study_name}' searched another space ({stored}); this search is "
            f"{described}. Use another --study-name"
        )
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:  # left RUNNING by an interrupted run
        log.warning("trial %d was interrupted; marking it failed", t.number)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    return study


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---------------------------------------------------------------------------------- workers


class _Objective:
    """The function a worker's study optimises: suggest, score task by task, log."""

    def __init__(self, space: Space, scorer: Scorer, settings: SearchSettings, worker: int) -> None:
        self.space, self.scorer, self.settings, self.worker = space, scorer, settings, worker
        # a min never rises, and a custom value need not grow task by task: neither is pruned
        self.prunable = settings.prune and settings.objective != "worst" and settings.value is None

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        candidate = self.space.suggest(trial)
        started = time.perf_counter()
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("pid", os.getpid())

        def report(step: int, scores: Mapping[str, float]) -> None:
            if not self.prunable:
                return
            trial.report(self._partial(scores), step)
            if trial.should_prune():
                self._finish(trial, candidate, "PRUNED", scores, started)
                raise optuna.TrialPruned()

        return self._finish(trial, candidate, "COMPLETE", self.scorer(candidate, report), started)

    def _partial(self, scores: Mapping[str, float]) -> float:
        """What the pruner compares: the objective with the tasks not yet scored counted as 0.

        It never decreases from one task to the next and ends at the objective, so comparing it
        between trials at the same step compares their partial means (Optuna's median rule keeps
        each trial's best intermediate value, which a running mean, going up and down, defeats).
        """
        padded = {t: scores.get(t, 0.0) for t in self.space.tasks}
        return aggregate(padded, self.settings.objective, self.settings.task_weights)

    def _finish(
        self, trial: optuna.Trial, candidate: Candidate, state: str, scores: Mapping[str, float], started: float
    ) -> float:
        """Record a finished trial's scores and time (trial attributes and the JSONL log)."""
        if self.settings.value is not None:
            value = self.settings.value(candidate, scores)
        else:
            value = aggregate(scores, self.settings.objective, self.settings.task_weights)
        seconds = time.perf_counter() - started
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("scores", dict(scores))
        if self.settings.log_path:
            line = json.dumps(
                {
                    "trial": trial.number,
                    "state": state,
                    "value": value,
                    "scores": dict(scores),
                    "parameters": candidate.parameters,
                    "weights": list(candidate.weights),
                    "seconds": round(seconds, 3),
                    "worker": self.worker,
                    "pid": os.getpid(),
                }
            )
            with open(self.settings.log_path, "a", encoding="utf-8") as f:  # one write per line
                f.write(line + "\n")
        return value


def run_worker(
    space: Space,
    scorer_factory: ScorerFactory,
    settings: SearchSettings,
    quota: int,
    worker: int,
    callbacks: list[Any] | None = None,
) -> int:
    """Run ``quota`` trials of the shared study (one worker); returns how many it ran."""
    import optuna

    _quiet_optuna()
    if quota <= 0:
        return 0
    parallel = settings.workers > 1
    study = optuna.load_study(
        study_name=settings.study_name,
        storage=open_storage(settings.storage),
        pruner=_pruner(settings, len(space.tasks)),
    )
    # a resumed study's sampler goes on with a stream of its own (seeded by the trials already
    # there): reseeded as at the start, its random start-up trials would repeat the first ones
    seed = settings.seed + worker + RESUME_SEED_STEP * len(study.trials)
    study.sampler = make_sampler(settings.sampler, seed, settings.startup_trials, parallel)
    objective = _Objective(space, scorer_factory(), settings, worker)
    study.optimize(objective, n_trials=quota, callbacks=callbacks or [], catch=(), gc_after_trial=False)
    return quota


def _quotas(remaining: int, workers: int) -> list[int]:
    """Split ``remaining`` trials over ``workers`` as evenly as possible."""
    base, extra = divmod(remaining, workers)
    return [base + (1 if i < extra else 0) for i in range(workers)]


def run_search(
    space: Space,
    scorer_factory: ScorerFactory,
    settings: SearchSettings,
    *,
    progress: bool = True,
    scorer: Scorer | None = None,
) -> SearchOutcome:
    """Run (or resume) the search until the study holds ``settings.trials`` finished trials.

    ``scorer``: an already built scorer for trials run in this process (its caches are reused);
    worker processes and Ray tasks build their own with ``scorer_factory``.

    Raises:
        ConfigError: bad settings, an existing study without ``resume``, another space.
        GuardmergeError: a worker failed, or no trial completed.
    """
    if settings.trials < 1:
        raise ConfigError("--trials must be at least 1")
    if settings.workers < 1:
        raise ConfigError("--workers must be at least 1")
    study = prepare_study(space, settings)
    done = _finished(study)
    remaining = max(settings.trials - done, 0)
    if done:
        log.info("study '%s' holds %d finished trials; %d to go", settings.study_name, done, remaining)
    quotas = [q for q in _quotas(remaining, settings.workers) if q > 0]
    bar = _Progress(study, settings.trials, done, progress)
    try:
        if settings.ray_address:
            _run_ray(space, scorer_factory, settings, quotas, bar)
        elif len(quotas) <= 1:
            local = scorer_factory if scorer is None else (lambda: scorer)
            run_worker(space, local, settings, sum(quotas), 0, callbacks=[bar.callback])
        else:
            _run_processes(space, scorer_factory, settings, quotas, bar)
    finally:
        bar.close()
    return outcome(study, space, settings)


def _run_processes(
    space: Space, scorer_factory: ScorerFactory, settings: SearchSettings, quotas: list[int], bar: _Progress
) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # torch and fork do not mix
    procs = [
        ctx.Process(target=run_worker, args=(space, scorer_factory, settings, q, i), daemon=False)
        for i, q in enumerate(quotas)
    ]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            bar.poll()
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    for p in procs:
        p.join()
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise GuardmergeError(
            f"search worker(s) {failed} failed (exit codes {[procs[i].exitcode for i in failed]}); see their log above"
        )


def _run_ray(
    space: Space, scorer_factory: ScorerFactory, settings: SearchSettings, quotas: list[int], bar: _Progress
) -> None:
    try:
        import ray
    except ImportError:
        raise GuardmergeError("the Ray backend needs ray: pip install 'guardmerge[ray]'") from None
    if not ray.is_initialized():
        address = None if settings.ray_address == "local" else settings.ray_address
        ray.init(address=address, log_to_driver=True, include_dashboard=False)
    if settings.storage.startswith("sqlite:///"):
        log.info(
            "Ray workers share the SQLite file %s: fine on one machine; use a database URL "
            "(--storage postgresql://...) when workers run on other nodes",
            settings.storage,
        )
    remote = ray.remote(num_cpus=1)(run_worker)
    refs = [remote.remote(space, scorer_factory, settings, q, i) for i, q in enumerate(quotas)]
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, timeout=1.0)
        bar.poll()
    ray.get(refs)  # re-raises a worker's error


class _Progress:
    """A progress bar over finished trials with the best value so far."""

    def __init__(self, study: optuna.Study, total: int, initial: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.study = study
        self.bar = tqdm(total=total, initial=initial, desc="search", unit="trial", disable=not enabled)
        self.seen = initial

    def _best(self) -> float | None:
        try:
            return float(self.study.best_value)
        except ValueError:
            return None

    def callback(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.poll()

    def poll(self) -> None:
        n = _finished(self.study)
        if n > self.seen:
            self.bar.update(n - self.seen)
            self.seen = n
            best = self._best()
            if best is not None:
                self.bar.set_postfix(best=f"{best:.4f}")

    def close(self) -> None:
        self.poll()
        self.bar.close()


# ---------------------------------------------------------------------------------- results


def outcome(study: optuna.Study, space: Space, settings: SearchSettings) -> SearchOutcome:
    """Summarise ``study`` (the best trial and every trial)."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise GuardmergeError(f"no trial of study '{settings.study_name}' completed; see the log")
    best = study.best_trial
    seconds = [t.user_attrs["seconds"] for t in trials if "seconds" in t.user_attrs]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    rows = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "scores": t.user_attrs.get("scores"),
            "seconds": t.user_attrs.get("seconds"),
            "worker": t.user_attrs.get("worker"),
        }
        for t in trials
    ]
    return SearchOutcome(
        best=space.from_values(best.params),
        best_value=float(best.value),  # type: ignore[arg-type]
        best_scores=dict(best.user_attrs.get("scores", {})),
        best_number=best.number,
        trials=rows,
        seconds_per_trial=statistics.median(seconds) if seconds else math.nan,
        counts=counts,
        space=space.describe(),
        settings={
            "sampler": settings.sampler,
            "seed": settings.seed,
            "objective": settings.objective,
            "task_weights": settings.task_weights,
            "workers": settings.workers,
            "ray": settings.ray_address,
            "storage": settings.storage,
            "study": settings.study_name,
            "prune": settings.prune,
        },
    )
