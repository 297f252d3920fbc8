"""The resolved merge job: a config checked once, with everything the stages need.

A :class:`MergeJob` is built from a :class:`~guardmerge.config.MergeConfig` once: every model
path is resolved to a local folder (hub ids downloaded), the method and its parameters are
validated against the registry, and the data plans (statistics, layer-wise solves, head
alignment) are fixed. The stages (:mod:`guardmerge.merge.stages`) and the search read the job
and never re-parse, re-resolve or re-validate it. A search candidate is the same job with other
parameters and weights (:meth:`MergeJob.with_candidate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from guardmerge.config import AlignConfig, MergeConfig
from guardmerge.errors import CheckpointError, ConfigError
from guardmerge.io.checkpoint import resolve
from guardmerge.io.formats import read_json
from guardmerge.methods import METHODS, MethodParams, MethodSpec
from guardmerge.models.adapters import ADAPTERS


@dataclass(frozen=True)
class ExpertJob:
    """One expert of a job.

    Attributes:
        task: head name in the merged model.
        source: the model as the config names it (folder or hub id), for provenance.
        folder: the local folder it resolved to.
        weight: per-expert coefficient ``w_i``.
        stats: precomputed statistics file, if given.
        data: unlabelled texts of the task, if given.
    """

    task: str
    source: str
    folder: Path
    weight: float
    stats: str | None = None
    data: str | None = None


@dataclass(frozen=True)
class MergeJob:
    """A merge config resolved and validated once; passed to every stage.

    Attributes:
        config: the config as validated (its ``parameters`` and expert weights match
            :attr:`params` and :attr:`experts`).
        base: the base model's local folder.
        experts: the experts, in config order.
        spec: the registered method.
        params: the method's validated parameters.
        statistics: the per-expert statistics the method needs (``gram``, ``fisher``), empty if none.
        layerwise: whether the method runs the layer-wise stage (needs every expert's ``data``).
        alignment: the head-alignment settings, or None when alignment is off.
    """

    config: MergeConfig
    base: Path
    experts: tuple[ExpertJob, ...]
    spec: MethodSpec[Any]
    params: MethodParams
    statistics: frozenset[str]
    layerwise: bool
    alignment: AlignConfig | None

    @classmethod
    def of(cls, config: MergeConfig | MergeJob) -> MergeJob:
        """``config`` resolved into a job (a job is returned as it is)."""
        if isinstance(config, MergeJob):
            return config
        spec = METHODS.get(config.method)
        experts = tuple(
            ExpertJob(task=e.task, source=e.model, folder=resolve(e.model), weight=e.weight, stats=e.stats, data=e.data)
            for e in config.experts
        )
        base = resolve(config.base_model)
        if spec.layerwise is not None:
            _check_layerwise_family(base, config.method)
        job = cls(
            config=config,
            base=base,
            experts=experts,
            spec=spec,
            params=config.method_params(),
            statistics=spec.needs,
            layerwise=spec.layerwise is not None,
            alignment=config.alignment(),
        )
        return job

    @property
    def tasks(self) -> list[str]:
        return [e.task for e in self.experts]

    @property
    def needs_data(self) -> bool:
        """Whether a stage runs models on the tasks' texts (layer-wise solves, branch alignment,
        head alignment)."""
        return self.layerwise or self.alignment is not None or self.config.branch_align

    def texts(self, limit: int | None) -> dict[str, list[str]]:
        """Each task's unlabelled texts (the first ``limit``), from its expert's ``data``."""
        from guardmerge.data import task_texts

        missing = [e.task for e in self.experts if not e.data]
        if missing:
            raise ConfigError(f"expert(s) {', '.join(missing)} need `data: FILE` (unlabelled texts of the task)")
        return {e.task: task_texts(e.data, limit) for e in self.experts if e.data}

    def with_candidate(self, parameters: Mapping[str, Any], weights: Sequence[float] | None = None) -> MergeJob:
        """The same job with other method parameters (validated) and per-expert weights."""
        params = self.spec.validate(parameters)
        experts = self.experts
        if weights is not None:
            if len(weights) != len(experts):
                raise ConfigError(f"{len(weights)} weights for {len(experts)} experts")
            experts = tuple(replace(e, weight=float(w)) for e, w in zip(experts, weights))
        config = self.config.model_copy(
            update={
                "parameters": params.model_dump(),
                "experts": [c.model_copy(update={"weight": e.weight}) for c, e in zip(self.config.experts, experts)],
            }
        )
        return replace(self, config=config, experts=experts, params=params)


def _check_layerwise_family(base: Path, method: str) -> None:
    """Refuse a layer-wise method on a family whose adapter says the stage cannot run on it,
    before any merging (an unreadable or unknown config is left to the checkpoint checks)."""
    cfg_file = base / "config.json"
    if not cfg_file.is_file():
        return
    try:
        config = read_json(cfg_file, error=CheckpointError, what="model config")
    except CheckpointError:
        return
    adapter = ADAPTERS.get(str(config.get("model_type", ""))) if isinstance(config, dict) else None
    problem = adapter.layerwise_problem(config) if adapter is not None else None
    if problem:
        raise ConfigError(f"method '{method}': {problem} (base {base}); use a method without a layer-wise stage")
