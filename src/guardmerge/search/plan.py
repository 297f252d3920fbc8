"""``guardmerge plan``: the cheapest merge whose every head agrees with its expert (issue 23, section 3).

A plan searches, on validation texts (labels never read), the combination of method, per-task
sharing depth (``share_layers``) and heal that keeps each head's agreement with its expert, on
its own task's texts and on every other task's, at or above a floor, at the least compute: the
encoder blocks one text runs through, ``max K_t + sum over tasks of (L - K_t)``, over ``L`` (one
pass = 1.0). It reuses the search machinery (:mod:`guardmerge.search.study`: an Optuna study in
a database, resumable, local or Ray workers) with its own space and scorer.

The value a trial maximises ranks every plan that meets the floor (and ``max_compute``) above
every plan that does not: ``-compute`` (plus a 1e-3 tie-break on the lowest agreement) when it
does, ``-10 - 10 x shortfall - excess compute`` when it does not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from guardmerge.config import DEFAULT_DEPTH, HealConfig, MergeConfig, parse_config
from guardmerge.errors import ConfigError
from guardmerge.search.objective import Report
from guardmerge.search.space import Candidate

if TYPE_CHECKING:
    import optuna

    from guardmerge.merge.job import MergeJob

log = logging.getLogger(__name__)

HEAL_CHOICES = ("off", "heads", "top", "all")
"""What a plan may do after the training-free merge: no heal, or heal with ``train`` set to this."""
INFEASIBLE = -10.0


@dataclass(frozen=True)
class PlanSpace:
    """What a plan searches: a method (its parameters from the config, else its defaults), each
    task's sharing depth, and heal (off or what trains). Same interface as
    :class:`~guardmerge.search.space.SearchSpace`."""

    methods: tuple[str, ...]
    depths: tuple[int, ...]
    heal: tuple[str, ...]
    tasks: tuple[str, ...]
    layers: int
    base_weights: tuple[float, ...]

    @property
    def dimensions(self) -> int:
        return (len(self.methods) > 1) + len(self.tasks) * (len(self.depths) > 1) + (len(self.heal) > 1)

    def suggest(self, trial: optuna.Trial) -> Candidate:
        """Draw a plan through ``trial``."""
        params: dict[str, Any] = {"method": trial.suggest_categorical("method", list(self.methods))}
        for task in self.tasks:
            params[f"depth.{task}"] = trial.suggest_categorical(f"depth.{task}", list(self.depths))
        params["heal"] = trial.suggest_categorical("heal", list(self.heal))
        return Candidate(params, self.base_weights)

    def from_values(self, values: Mapping[str, Any]) -> Candidate:
        """The plan a finished trial's ``params`` describe."""
        keys = ["method", *(f"depth.{t}" for t in self.tasks), "heal"]
        return Candidate({k: values[k] for k in keys}, self.base_weights)

    def describe(self) -> dict[str, Any]:
        return {"plan": {"methods": list(self.methods), "depths": list(self.depths), "heal": list(self.heal)}}

    def depths_of(self, candidate: Candidate) -> dict[str, int]:
        return {t: int(candidate.parameters[f"depth.{t}"]) for t in self.tasks}

    def compute(self, candidate: Candidate) -> float:
        """Encoder blocks per text over one pass: ``(max K_t + sum (L - K_t)) / L``."""
        depths = self.depths_of(candidate).values()
        return (max(depths) + sum(self.layers - k for k in depths)) / self.layers


def build_plan_space(
    config: MergeConfig,
    layers: int,
    *,
    methods: Sequence[str] | None = None,
    depths: Sequence[int] | None = None,
    heal: Sequence[str] = ("off", "top"),
) -> PlanSpace:
    """The plan space of ``config`` on an ``L = layers`` encoder: ``methods`` (default the
    config's), ``depths`` (default ``L, L-1, L-2``) and ``heal`` choices (:data:`HEAL_CHOICES`).

    Raises:
        ConfigError: an unknown method or heal choice, a depth outside ``1..L``, an empty choice.
    """
    from guardmerge.methods import METHODS

    chosen = tuple(methods or (config.method,))
    for name in chosen:
        METHODS.get(name)  # raises ConfigError naming the known methods
    ks = tuple(sorted(set(depths or (layers, layers - 1, layers - 2)), reverse=True))
    bad = [k for k in ks if not 0 <= k <= layers]
    if bad or not ks:
        raise ConfigError(f"--depths {list(ks)}: each depth must be in 0..{layers} (the base has {layers} layers)")
    unknown = sorted(set(heal) - set(HEAL_CHOICES))
    if unknown or not heal:
        raise ConfigError(f"--heal {list(heal)}: choose from {', '.join(HEAL_CHOICES)}")
    tasks = tuple(e.task for e in config.experts)
    return PlanSpace(chosen, ks, tuple(heal), tasks, layers, tuple(e.weight for e in config.experts))


def plan_value(scores: Mapping[str, float], compute: float, min_agreement: float, max_compute: float | None) -> float:
    """What the study maximises (module docstring): feasible plans by least compute, the others
    by how far they miss."""
    low = min(scores.values())
    excess = max(0.0, compute - max_compute) if max_compute is not None else 0.0
    if low >= min_agreement and excess == 0.0:
        return -compute + 1e-3 * low
    return INFEASIBLE - 10 * max(0.0, min_agreement - low) - excess


def plan_config(config: MergeConfig, space: PlanSpace, candidate: Candidate) -> MergeConfig:
    """The merge config of one plan: ``config`` with its method (the config's parameters when it
    is the config's method), per-task ``share_layers`` (unset when every task shares all
    layers) and ``heal`` (the config's ``heal:`` settings, or the defaults, with ``train`` set)."""
    p = candidate.parameters
    method = str(p["method"])
    depths = space.depths_of(candidate)
    share: dict[str, int] | None = None
    if any(k != space.layers for k in depths.values()):
        share = {DEFAULT_DEPTH: space.layers, **{t: k for t, k in depths.items() if k != space.layers}}
    heal = None
    if p["heal"] != "off":
        heal = (config.heal or HealConfig()).model_copy(update={"train": p["heal"]}).model_dump()
    raw = config.model_dump()
    raw.update(
        method=method,
        parameters=config.parameters if method == config.method else {},
        share_layers=share,
        branch_align=config.branch_align and share is not None,
        heal=heal,
    )
    return parse_config(raw, source=f"plan {p}")


def _pooled(texts: Mapping[str, Sequence[str]]) -> list[str]:
    return [x for chunk in texts.values() for x in chunk]


class PlanScorer:
    """Scores a plan: merge it, then each head's agreement with its expert on the validation
    texts of every task (the lower of own-task and off-task), by
    :func:`~guardmerge.evaluate.fidelity.compare_logits`. The experts run once."""

    def __init__(
        self,
        config: MergeConfig,
        space: PlanSpace,
        texts: Mapping[str, Sequence[str]],
        *,
        work_dir: str | None = None,
        max_length: int = 128,
    ) -> None:
        from guardmerge.evaluate.fidelity import head_logits
        from guardmerge.merge.align import FeatureCache
        from guardmerge.models.multihead import load_any

        self.config, self.space, self.max_length = config, space, max_length
        self.texts = {t: list(texts[t]) for t in space.tasks}
        pool = _pooled(self.texts)
        self.theirs: dict[str, np.ndarray] = {}
        for e in config.experts:
            expert = load_any(e.model, e.task)
            head = e.task if e.task in expert.tasks else expert.tasks[0]
            self.theirs[e.task] = head_logits(expert, pool, [head], max_length=max_length)[head]
        self.features = FeatureCache(Path(work_dir) / "features") if work_dir else None
        self._seen: dict[str, dict[str, float]] = {}

    def config_for(self, candidate: Candidate) -> MergeJob:
        from guardmerge.merge.job import MergeJob

        return MergeJob.of(plan_config(self.config, self.space, candidate))

    def statistics(self, job: MergeJob) -> None:
        return None  # each plan's stages compute (and cache) what they need

    def close(self) -> None:
        """Nothing held open between plans."""

    def __call__(self, candidate: Candidate, report: Report) -> dict[str, float]:
        from guardmerge.evaluate.fidelity import compare_logits, head_logits
        from guardmerge.merge.stages import build

        key = candidate.key()
        if key in self._seen:  # a sampler may draw a plan again: its score is reused
            return dict(self._seen[key])
        job = self.config_for(candidate)
        model = build(job, progress=False, feature_cache=self.features).to_model().eval()
        mine = head_logits(model, _pooled(self.texts), list(self.space.tasks), max_length=self.max_length)
        fid = compare_logits(model, self.texts, mine, self.theirs, max_length=self.max_length, draws=1)
        scores = {t: min(r["agreement"], r.get("off_task_agreement", 1.0)) for t, r in fid.items()}
        report(len(scores) - 1, scores)
        self._seen[key] = dict(scores)
        return scores


@dataclass(frozen=True)
class PlanValue:
    """The trial value of a plan (picklable for worker processes): :func:`plan_value`."""

    space: PlanSpace
    min_agreement: float
    max_compute: float | None

    def __call__(self, candidate: Candidate, scores: Mapping[str, float]) -> float:
        return plan_value(scores, self.space.compute(candidate), self.min_agreement, self.max_compute)


def frontier(outcome_trials: Sequence[Mapping[str, Any]], space: PlanSpace, value: PlanValue) -> list[dict[str, Any]]:
    """Every scored plan (compute, lowest agreement, feasible), cheapest first, each marked
    ``pareto`` when no other plan is at most as costly with a higher lowest agreement."""
    rows = []
    for t in outcome_trials:
        if not t.get("scores"):
            continue
        cand = space.from_values(t["params"])
        low = min(t["scores"].values())
        compute = space.compute(cand)
        rows.append(
            {
                "trial": t["number"],
                "plan": cand.parameters,
                "compute": compute,
                "min_agreement": low,
                "agreement": t["scores"],
                "feasible": value(cand, t["scores"]) > INFEASIBLE,
            }
        )
    rows.sort(key=lambda r: (r["compute"], -r["min_agreement"]))
    best = -1.0
    for r in rows:
        r["pareto"] = r["min_agreement"] > best
        best = max(best, r["min_agreement"])
    return rows


def frontier_table(rows: Sequence[Mapping[str, Any]], chosen: int) -> str:
    """The frontier as text: one line per plan (``*`` the chosen one, ``p`` on the Pareto front)."""
    lines = [f"{'':2}{'trial':>5}  {'compute':>7}  {'min agreement':>13}  {'meets':>5}  plan"]
    for r in rows:
        mark = ("*" if r["trial"] == chosen else " ") + ("p" if r["pareto"] else " ")
        p = r["plan"]
        depths = ",".join(f"{k.removeprefix('depth.')}={v}" for k, v in p.items() if k.startswith("depth."))
        lines.append(
            f"{mark}{r['trial']:>5}  {r['compute']:>7.3f}  {r['min_agreement']:>13.4f}  "
            f"{'yes' if r['feasible'] else 'no':>5}  {p['method']} heal={p['heal']} depths {depths}"
        )
    return "\n".join(lines)


def encoder_layers(config: MergeConfig) -> int:
    """``L``: the base encoder's blocks, read by the architecture adapter (opens the job once)."""
    from guardmerge.merge.job import MergeJob

    job = MergeJob.of(config)
    with job.open():
        return job.plan.adapter.num_blocks(job.plan.merge_names)


def plan_card(summary: Mapping[str, Any]) -> str:
    """Markdown for the model card of a planned merge."""
    chosen = summary["chosen"]
    meets = "meets" if summary["meets_floor"] else "does NOT meet"
    low = min(chosen["agreement"].values())
    return "\n".join(
        [
            "## Plan",
            "",
            f"Chosen by `guardmerge plan` from {len(summary['frontier'])} scored plans: the cheapest whose every head "
            f"agrees with its expert on at least {summary['min_agreement']} of the validation texts (own task "
            f"and off-task). This plan {meets} the floor: lowest agreement {low:.4f} at compute "
            f"{chosen['compute']:.3f}x one pass.",
            "",
            f"- Plan: {chosen['plan']}",
            "- Every plan scored: `plan.json`.",
        ]
    )


def plan_to_folder(
    cfg: MergeConfig,
    data: Path,
    out: Path,
    settings: Any,
    *,
    min_agreement: float = 0.97,
    max_compute: float | None = None,
    methods: Sequence[str] | None = None,
    depths: Sequence[int] | None = None,
    heal: Sequence[str] = ("off", "top"),
    val_limit: int | None = 200,
    storage: str | None = None,
    force: bool = False,
    progress: bool = True,
    inputs: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Search plans of ``cfg`` (``settings``: a :class:`~guardmerge.search.study.SearchSettings`
    for trials, sampler, seed, study and workers) on the validation texts of ``data``'s task
    folders; write the chosen merge to ``out`` with ``plan.json``; return its summary.

    The study, its trial log and the caches live in ``OUT.plan/``, so a plan resumes.

    Raises:
        ConfigError: a floor outside (0, 1], ``max_compute`` below 1, a task without
            validation texts, heal asked of experts without ``data``, bad choices.
    """
    import dataclasses
    import json
    from functools import partial

    from guardmerge.evaluate.fidelity import fidelity_texts
    from guardmerge.io import check_output
    from guardmerge.merge.stages import build
    from guardmerge.merge.write import write_result
    from guardmerge.search.study import run_search

    if not 0 < min_agreement <= 1:
        raise ConfigError(f"--min-agreement {min_agreement}: a share of texts in (0, 1]")
    if max_compute is not None and max_compute < 1:
        raise ConfigError(f"--max-compute {max_compute}: one pass costs 1.0; give at least 1")
    check_output(out, force=force, inputs=[*inputs, data, *cfg.input_paths()])
    space = build_plan_space(cfg, encoder_layers(cfg), methods=methods, depths=depths, heal=heal)
    no_data = [e.task for e in cfg.experts if not e.data]
    if no_data and set(space.heal) - {"off"}:
        raise ConfigError(f"--heal {','.join(space.heal)}: expert(s) {', '.join(no_data)} give no `data:` to heal on")
    texts = fidelity_texts(data, split="validation", limit=val_limit)
    missing = [t for t in space.tasks if t not in texts]
    if missing:
        raise ConfigError(f"plan: no validation texts for task(s) {', '.join(missing)} under {data}")
    work = out.parent / f"{out.name}.plan"
    texts = {t: texts[t] for t in space.tasks}
    scorer = PlanScorer(cfg, space, texts, work_dir=str(work))
    work.mkdir(parents=True, exist_ok=True)
    value = PlanValue(space, min_agreement, max_compute)
    settings = dataclasses.replace(
        settings,
        storage=storage or f"sqlite:///{(work / 'study.db').resolve()}",
        log_path=str(work / "trials.jsonl"),
        prune=False,
        value=value,
    )
    result = run_search(
        space, partial(PlanScorer, cfg, space, texts, work_dir=str(work)), settings, progress=progress, scorer=scorer
    )
    rows = frontier(result.trials, space, value)
    chosen = next(r for r in rows if r["trial"] == result.best_number)
    summary = {
        "min_agreement": min_agreement,
        "max_compute": max_compute,
        "meets_floor": bool(chosen["feasible"]),
        "chosen": chosen,
        "frontier": rows,
        "space": space.describe(),
        "layers": space.layers,
        "validation_texts": {t: len(v) for t, v in texts.items()},
        "seconds_per_trial": result.seconds_per_trial,
        "frontier_table": frontier_table(rows, result.best_number),
    }
    if not chosen["feasible"]:
        log.warning(
            "no plan met the floor %.3f%s; writing the closest (lowest agreement %.4f)",
            min_agreement,
            f" within compute {max_compute}" if max_compute else "",
            chosen["min_agreement"],
        )
    job = scorer.config_for(result.best)
    merged = build(job, progress=progress, feature_cache=scorer.features)
    merged.info.setdefault("card_sections", []).append(plan_card(summary))
    extra = {"plan.json": (json.dumps(summary, indent=2, default=str) + "\n").encode()}
    write_result(merged, out, job.config, force=force, extra_files=extra)
    return summary
