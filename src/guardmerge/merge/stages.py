"""The whole merge: one open :class:`~guardmerge.merge.job.MergeJob`, its stages in order, one output.

The stages, declared once in :data:`STAGES`, run top to bottom on the open job (each base and
expert opened once) and hand on a :class:`MergeState`:

1. **statistics** (:mod:`guardmerge.merge.statistics`): the experts' Grams / Fishers, for
   methods that need them;
2. **tensor merge** (:mod:`guardmerge.merge.engine`): the method mapped over the checkpoints;
3. **layer-wise solves** (:mod:`guardmerge.merge.layerwise`): ``lot``, ``regmean_pp``,
   ``prodistill`` (with ``share_layers: K``, the K shared blocks only);
4. **branch alignment** (:mod:`guardmerge.merge.branches`), with ``branch_align``;
5. **heal** (:mod:`guardmerge.merge.heal`), with a ``heal:`` section: label-free distillation
   from the experts, the one stage that trains weights (it starts from stages 2 to 4's model);
6. **head alignment** (:mod:`guardmerge.merge.align`), when the job's alignment plan says;

then the **write** (:mod:`guardmerge.merge.write`), the one output path. Stages 3 to 6 run the
merged model (built once from the merged tensors) on the tasks' texts; without them the merge
streams straight from the checkpoints to the output folder. The CLI, the benchmarks and the
search all run these same stages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guardmerge.config import AlignConfig, MergeConfig
from guardmerge.io import check_output
from guardmerge.merge.align import FeatureCache, align_heads
from guardmerge.merge.engine import merge, stream_to_folder
from guardmerge.merge.job import MergeJob
from guardmerge.merge.result import MergeResult
from guardmerge.merge.statistics import statistics_stage
from guardmerge.merge.write import write_result
from guardmerge.models.adapters import capped_length
from guardmerge.models.branches import BRANCH_PREFIX
from guardmerge.models.multihead import MultiHeadModel
from guardmerge.stats import ExpertStats

log = logging.getLogger(__name__)


@dataclass
class MergeState:
    """What the stages hand on: the statistics, the merged tensors, the merged model (built once,
    for the stages that run it) and the tasks' texts (read once)."""

    stats: Sequence[ExpertStats] | None = None
    result: MergeResult | None = None
    model: MultiHeadModel | None = None
    texts: dict[str, list[str]] | None = None
    progress: bool = True
    feature_cache: FeatureCache | None = None

    def merged(self) -> MergeResult:
        assert self.result is not None, "the tensor merge runs first"
        return self.result

    def merged_model(self) -> MultiHeadModel:
        if self.model is None:
            self.model = self.merged().to_model()
        return self.model

    def task_texts(self, job: MergeJob) -> dict[str, list[str]]:
        if self.texts is None:
            self.texts = job.texts(job.text_count())
        return self.texts


@dataclass(frozen=True)
class Stage:
    """One stage: its name, whether the job asks for it, and what it does to the state."""

    name: str
    applies: Callable[[MergeJob], bool]
    run: Callable[[MergeJob, MergeState], None]


def _statistics(job: MergeJob, state: MergeState) -> None:
    state.stats = statistics_stage(job, state.stats, state.progress)


def _tensor_merge(job: MergeJob, state: MergeState) -> None:
    state.result = merge(job, progress=state.progress, stats=state.stats)


def _layerwise(job: MergeJob, state: MergeState) -> None:
    from guardmerge.merge.layerwise import layerwise_stage

    model, params = state.merged_model(), job.params
    spec = job.spec.layerwise
    assert spec is not None
    texts = spec.text_count(params)
    state.merged().info["layerwise"] = layerwise_stage(
        model,
        {e.task: job.expert_model(e.task) for e in job.experts},
        {t: x[:texts] for t, x in state.task_texts(job).items()},
        {e.task: e.weight for e in job.experts},
        spec,
        params,
        base=job.base_tensors() if spec.fit is not None else None,
        max_length=capped_length(getattr(params, "max_length", 128), model.config, f"method {job.spec.name}"),
        batch_size=getattr(params, "batch_size", 32),
        progress=state.progress,
        shared_blocks=model.trunk_cut,
    )


def _branched(job: MergeJob) -> bool:
    if job.branch_align and not job.plan.branch_names:
        log.warning("branch_align: share_layers %s shares every layer: no branch to align", job.config.share_layers)
    return job.branch_align and bool(job.plan.branch_names)


def _branch_align(job: MergeJob, state: MergeState) -> None:
    from guardmerge.merge.branches import branch_align_stage

    fit = job.alignment or AlignConfig()  # the branch fit reads as many texts as head alignment
    state.merged().info["branch_align"] = branch_align_stage(
        state.merged_model(),
        {e.task: job.expert_model(e.task) for e in job.experts},
        {t: x[: fit.examples] for t, x in state.task_texts(job).items()},
        max_length=fit.max_length,
        batch_size=fit.batch_size,
    )


def _heal(job: MergeJob, state: MergeState) -> None:
    from guardmerge.merge.heal import heal_stage

    state.merged().info["heal"] = heal_stage(job, state.merged_model(), state.task_texts(job), state.progress)


def _head_align(job: MergeJob, state: MergeState) -> None:
    assert job.alignment is not None
    report = align_heads(
        state.merged_model(),
        {e.task: e.folder for e in job.experts},
        state.task_texts(job),
        job.alignment,
        state.feature_cache or FeatureCache(),
        expert_models=job.expert_model,
    )
    state.merged().info["align_heads"] = {"settings": job.alignment.model_dump(), "report": report}


STAGES: tuple[Stage, ...] = (
    Stage("statistics", lambda job: bool(job.statistics), _statistics),
    Stage("tensor merge", lambda job: True, _tensor_merge),
    Stage("layer-wise solves", lambda job: job.layerwise, _layerwise),
    Stage("branch alignment", _branched, _branch_align),
    Stage("heal", lambda job: job.heal is not None, _heal),
    Stage("head alignment", lambda job: job.alignment is not None, _head_align),
)
"""Every stage of a merge, in the order they run."""


def _sync(state: MergeState) -> MergeResult:
    """The merged result with what the data stages changed in the model written back (in the
    merged dtypes; a branch's fitted ``align`` added)."""
    result = state.merged()
    if state.model is not None:
        for name, tensor in state.model.state_tensors().items():
            if name in result.tensors:
                result.tensors[name] = tensor.to(result.tensors[name].dtype)
            elif name.startswith(BRANCH_PREFIX):
                result.tensors[name] = tensor.clone()
    return result


def build(
    job: MergeJob,
    *,
    progress: bool = True,
    stats: Sequence[ExpertStats] | None = None,
    feature_cache: FeatureCache | None = None,
) -> MergeResult:
    """Run every stage of ``job`` in memory (opening it once) and return the merged result.

    Statistics (for methods that need them) come from ``stats`` when given, else from each
    expert's `stats` file or `data`; the layer-wise solves and alignments run when the job says.
    """
    state = MergeState(stats=stats, progress=progress, feature_cache=feature_cache)
    with job.open(progress):
        for stage in STAGES:
            if stage.applies(job):
                log.debug("stage: %s", stage.name)
                stage.run(job, state)
    return _sync(state)


def merge_to_folder(
    job: MergeJob,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    stats: Sequence[ExpertStats] | None = None,
    max_shard_bytes: int | None = None,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Run ``job`` and write the output folder atomically (refuses an existing ``out``, and one
    that touches an input: the job's, and ``inputs`` such as the config file).

    Without a data stage the merge streams straight to disk, tensor by tensor, into shards of
    at most ``max_shard_bytes``; with one, the model is merged in memory, refined, then written.
    """
    check_output(out, force=force, inputs=[*job.input_paths(), *inputs])
    with job.open(progress):
        if job.needs_data:
            result = build(job, progress=progress, stats=stats)
            write_result(result, out, job.config, force=force, max_shard_bytes=max_shard_bytes)
        else:
            stats = statistics_stage(job, stats, progress)
            stream_to_folder(job, out, force=force, progress=progress, stats=stats, max_shard_bytes=max_shard_bytes)
    return Path(out)


def self_merge_config(
    base: str, expert: str, method: str, parameters: dict | None = None, *, task: str = "task", seed: int = 0
) -> MergeConfig:
    """HM3 self-merging: one expert against its base, ``theta_0 + scaling * sparsify(tau)``."""
    from guardmerge.config import parse_config

    return parse_config(
        {
            "base_model": base,
            "experts": [{"model": expert, "task": task}],
            "method": method,
            "parameters": dict(parameters or {}),
            "seed": seed,
            "align_heads": False,
        },
        source="self-merge",
    )
