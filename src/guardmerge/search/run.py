"""``guardmerge search`` end to end: check the output and the data, run the study, write the best
merge. The CLI parses its options and calls :func:`search_to_folder`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from guardmerge.config import MergeConfig, split_assignment
from guardmerge.errors import ConfigError
from guardmerge.search.objective import MergeScorer, SearchJob
from guardmerge.search.output import write_best
from guardmerge.search.space import build_space
from guardmerge.search.study import SearchOutcome, SearchSettings, run_search


def parse_weight_range(text: str | None) -> tuple[float, float] | None:
    """``--weights 0.5,3.0`` -> ``(0.5, 3.0)``; None when not given."""
    if not text:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--weights '{text}' must look like LOW,HIGH (e.g. 0.5,3.0)") from None
    return lo, hi


def parse_task_weights(items: Sequence[str]) -> dict[str, float]:
    """``--task-weight injection=2`` (repeated) -> ``{"injection": 2.0}``."""
    out: dict[str, float] = {}
    for item in items:
        task, raw = split_assignment(item, "--task-weight", "TASK=W")
        try:
            out[task] = float(raw)
        except ValueError:
            raise ConfigError(f"--task-weight '{item}': '{raw}' is not a number") from None
    return out


def search_to_folder(
    cfg: MergeConfig,
    data: Path,
    out: Path,
    settings: SearchSettings,
    *,
    only: list[str] | None = None,
    weight_range: tuple[float, float] | None = None,
    val_limit: int | None = 200,
    storage: str | None = None,
    force: bool = False,
    progress: bool = True,
    inputs: Sequence[str | Path] = (),
) -> SearchOutcome:
    """Search ``cfg``'s method parameters (and per-expert weights in ``weight_range``) on the
    validation split of ``data``; write the best merge to ``out``.

    The study's database (unless ``storage`` names an Optuna storage URL), its trial log and the
    caches live in ``OUT.search/`` beside ``out``, so a search can be resumed.
    """
    from guardmerge.io import check_output

    check_output(out, force=force, inputs=[*inputs, data, *cfg.input_paths()])
    space = build_space(
        cfg.method,
        cfg.parameters,
        [e.task for e in cfg.experts],
        [e.weight for e in cfg.experts],
        only=only,
        weight_range=weight_range,
    )
    if settings.objective not in ("mean", "worst", "weighted"):
        raise ConfigError(f"--objective '{settings.objective}': choose mean, worst or weighted")
    work = out.parent / f"{out.name}.search"
    job = SearchJob(config=cfg, data_dir=str(data), val_limit=val_limit, work_dir=str(work))
    scorer = MergeScorer(job)  # checks the data before any trial (and before OUT.search exists)
    work.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(
        settings,
        storage=storage or f"sqlite:///{(work / 'study.db').resolve()}",
        log_path=str(work / "trials.jsonl"),
    )
    result = run_search(space, partial(MergeScorer, job), settings, progress=progress, scorer=scorer)
    write_best(scorer, result, out, force=force, progress=progress)
    return result


def summary_line(result: SearchOutcome) -> str:
    """One line: trials, the best objective, its parameters and weights, seconds per trial."""
    best = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best.parameters.items())
    return (
        f"best of {sum(result.counts.values())} trials: {result.best_value:.4f} ({best}; weights "
        f"{[round(w, 3) for w in result.best.weights]}); {result.seconds_per_trial:.1f} s/trial"
    )


def parse_param_list(params: str | None) -> list[str] | None:
    """``--params``: None = every declared parameter, 'none' = no parameter."""
    if params is None:
        return None
    if params.strip().lower() == "none":
        return []
    return [p.strip() for p in params.split(",") if p.strip()]
