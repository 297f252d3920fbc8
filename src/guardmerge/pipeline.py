"""The whole merge, as stages over one :class:`~guardmerge.merge.job.MergeJob`.

A config is resolved into a job once (:meth:`MergeJob.of`), then the stages run top to bottom:

1. **statistics** (:func:`statistics_stage`): the experts' Grams / Fishers, for methods that need them;
2. **tensor merge** (:func:`guardmerge.engine.merge`): the method mapped over the checkpoints;
3. **layer-wise solves** (:func:`guardmerge.merge.layerwise.layerwise_stage`): ``lot``, ``regmean_pp``,
   ``prodistill``
   (with ``share_layers: K``, the K shared blocks only);
3b. **branch alignment** (:func:`guardmerge.merge.branches.branch_align_stage`), with ``branch_align``;
4. **head alignment** (:func:`guardmerge.refit.align_heads`), when the job's alignment plan says;
5. **write** (:func:`guardmerge.engine.write_folder`), the one output path.

Stages 3 and 4 run the merged model (built once from the merged tensors) on the tasks' texts;
without them the merge streams straight from the checkpoints to the output folder. The CLI, the
benchmarks and the search all run these same stages.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from guardmerge.config import AlignConfig, MergeConfig, StatsConfig
from guardmerge.data import task_texts
from guardmerge.engine import (
    MergeResult,
    merge,
    sparsified_experts,
    stream_to_folder,
    write_result,
)
from guardmerge.errors import StatisticsError
from guardmerge.io import check_output
from guardmerge.io.checkpoint import resolve
from guardmerge.merge.job import MergeJob
from guardmerge.models.adapters import capped_length, encoder_names
from guardmerge.models.checkpoint import Checkpoint
from guardmerge.models.multihead import BRANCH_PREFIX, MultiHeadModel
from guardmerge.refit import FeatureCache, align_heads
from guardmerge.stats import (
    ExpertStats,
    collect_fisher,
    collect_grams,
    derive_fingerprint,
    expert_fingerprint,
    load_stats,
    save_stats,
    tokenize_batches,
)

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$GUARDMERGE_CACHE``, else ``~/.cache/guardmerge``: statistics computed from `data`."""
    return Path(os.environ.get("GUARDMERGE_CACHE") or Path.home() / ".cache" / "guardmerge")


def compute_stats(
    expert: str | Path,
    texts: Sequence[str],
    kinds: frozenset[str] | set[str],
    settings: StatsConfig,
    *,
    labels: Sequence[int] | None = None,
    progress: bool = True,
    encoder_state: Mapping[str, torch.Tensor] | None = None,
    allow_pickle: bool = False,
) -> ExpertStats:
    """Run ``expert`` over ``texts`` and collect the statistics ``kinds`` (``gram``, ``fisher``).

    ``encoder_state`` (canonical names) replaces the expert's encoder tensors first: the
    statistics of a sparsified expert (``dare_regmean``). A pickle checkpoint is refused unless
    ``allow_pickle``; ``settings.max_length`` is capped at the model's positions, and texts at
    :data:`~guardmerge.data.MAX_TEXT_CHARS` characters.
    """
    from guardmerge.data import MAX_TEXT_CHARS
    from guardmerge.models.multihead import load_tokenizer
    from guardmerge.models.stock import stock_model

    folder = resolve(expert)
    with Checkpoint(folder, allow_pickle=allow_pickle, where=f"expert {expert}") as ck:
        settings = settings.model_copy(
            update={"max_length": capped_length(settings.max_length, ck.config, f"statistics of {expert}")}
        )
        token = ck.problem == "token"
    if "fisher" in kinds and token:
        raise StatisticsError(
            f"expert {expert} is a token classifier: Fisher statistics are defined for sequence heads only; "
            "merge it with a Gram-based (regmean) or data-free method"
        )
    long = sum(len(t) > MAX_TEXT_CHARS for t in texts)
    if long:
        log.warning("statistics of %s: %d text(s) truncated to %d characters", expert, long, MAX_TEXT_CHARS)
        texts = [t[:MAX_TEXT_CHARS] for t in texts]
    tok = load_tokenizer(folder, required=True)
    # read as a sequence classifier: Grams read only the encoder's inputs (a token classifier's
    # pooler and head, which it lacks, are initialised by the class and never used)
    fresh = ("pooler.", *ck.adapter.head_prefixes) if token else ()
    model = stock_model(folder, fresh=fresh, allow_pickle=allow_pickle, where=f"expert {expert}")
    if encoder_state is not None:
        adapter = ck.adapter
        own = model.state_dict()
        missing = [n for n in encoder_state if adapter.prefixed(n) not in own]
        if missing:
            raise StatisticsError(f"{expert}: cannot place sparsified tensor '{missing[0]}'")
        model.load_state_dict({adapter.prefixed(n): t for n, t in encoder_state.items()}, strict=False)
    batches = tokenize_batches(
        tok,
        list(texts),
        labels=labels,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        sort_by_length=True,
    )
    gram = fisher = None
    if "gram" in kinds:
        gram = collect_grams(
            model, batches, include_padding=settings.include_padding, max_length=settings.max_length, progress=progress
        )
    if "fisher" in kinds:
        fisher = collect_fisher(
            model,
            batches,
            label_mode=settings.fisher_labels,
            gradient=settings.fisher_gradient,
            max_length=settings.max_length,
            progress=progress,
        )
    return ExpertStats(fingerprint=expert_fingerprint(folder), gram=gram, fisher=fisher, expert=str(expert))


def expert_statistics(
    config: MergeJob | MergeConfig, kinds: frozenset[str], *, progress: bool = True, cache: Path | None = None
) -> list[ExpertStats]:
    """Statistics of every expert, in config order: loaded from `stats` files (checked against
    the expert's fingerprint) or computed from `data` and cached by fingerprint and settings."""
    job = MergeJob.of(config)
    config = job.config
    out = []
    cache = cache or default_cache_dir() / "stats"
    states = None
    variant: dict[str, object] = {}
    if job.spec.sparsify is not None:  # statistics of the sparsified experts (ALGORITHMS.md 2)
        variant = {"sparsified_by": config.method, "seed": config.seed, **job.params.model_dump()}
    for i, e in enumerate(job.experts):
        fingerprint = expert_fingerprint(e.folder)
        if variant:
            fingerprint = derive_fingerprint(fingerprint, **variant)
        if e.stats:
            out.append(load_stats(e.stats, fingerprint=fingerprint, kinds=sorted(kinds)))
            continue
        if not e.data:
            raise StatisticsError(f"expert '{e.task}' has neither `stats` nor `data`")
        texts = task_texts(e.data, config.statistics.examples)
        key = derive_fingerprint(
            fingerprint, kinds=sorted(kinds), texts=_text_digest(texts), **config.statistics.model_dump()
        )
        path = cache / f"{e.task}-{key.split(':')[-1][:16]}.safetensors"
        if path.is_file():
            log.info("statistics of '%s': cached %s", e.task, path)
            out.append(load_stats(path, fingerprint=fingerprint, kinds=sorted(kinds)))
            continue
        log.info("statistics of '%s': computing %s on %d texts", e.task, "+".join(sorted(kinds)), len(texts))
        if variant and states is None:
            states = sparsified_experts(job)
        stats = compute_stats(
            e.folder,
            texts,
            kinds,
            config.statistics,
            progress=progress,
            allow_pickle=config.allow_pickle,
            encoder_state=states[i] if states is not None else None,
        )
        stats.fingerprint = fingerprint
        save_stats(path, gram=stats.gram, fisher=stats.fisher, fingerprint=fingerprint, expert=e.source)
        out.append(stats)
    return out


def _text_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()[:16]


def statistics_stage(
    job: MergeJob, stats: Sequence[ExpertStats] | None = None, progress: bool = True
) -> Sequence[ExpertStats] | None:
    """Stage 1: ``stats`` if given, else the experts' statistics when the method needs some."""
    if job.statistics and stats is None:
        return expert_statistics(job, job.statistics, progress=progress)
    return stats


def _base_tensors(job: MergeJob) -> dict[str, torch.Tensor]:
    """The base model's encoder tensors under canonical names (a per-block fit's ``theta_0``)."""
    with Checkpoint(job.base, allow_pickle=job.config.allow_pickle) as ck:
        return {n: ck.get(n) for n in encoder_names(ck.adapter, ck.names())}


def _base_pooler(job: MergeJob) -> dict[str, torch.Tensor]:
    """The base's pooler tensors (canonical names; empty without one): what an expert that
    stores none (a token classifier) is merged as having."""
    with Checkpoint(job.base, allow_pickle=job.config.allow_pickle) as ck:
        return {n: ck.get(n) for n in ck.names() if ck.adapter.is_pooler(n)}


def data_stages(
    job: MergeJob, result: MergeResult, *, progress: bool = True, feature_cache: FeatureCache | None = None
) -> MergeResult:
    """Stages 3 and 4 on a merged result, in place: layer-wise solves, branch alignment, then
    head alignment.

    The merged model is built once from ``result``; the tensors the stages change are written
    back into ``result.tensors`` (in their merged dtype; new branch ``align`` tensors added).
    """
    if not job.needs_data:
        return result
    model = result.to_model()
    layerwise, align = job.spec.layerwise if job.layerwise else None, job.alignment
    branch_align = job.config.branch_align and model.share_layers is not None
    if job.config.branch_align and not branch_align:
        log.warning(
            "branch_align: share_layers %s shares every layer, so there is no branch to align", job.config.share_layers
        )
    fit = align or AlignConfig()  # the branch fit reads as many texts as head alignment
    texts = job.texts(
        max(
            getattr(job.params, "texts", 0) if layerwise else 0,
            align.examples if align else 0,
            fit.examples if branch_align else 0,
        )
    )
    experts: dict[str, MultiHeadModel] = {}
    if layerwise is not None or branch_align:
        fill = _base_pooler(job) if layerwise is not None else None  # for token experts, which have none
        experts = {
            e.task: MultiHeadModel.from_classifier(e.folder, e.task, allow_pickle=job.config.allow_pickle, fill=fill)
            for e in job.experts
        }
    if layerwise is not None:
        from guardmerge.merge.layerwise import layerwise_stage

        params: Any = job.params
        result.info["layerwise"] = layerwise_stage(
            model,
            experts,
            {t: x[: params.texts] for t, x in texts.items()},
            {e.task: e.weight for e in job.experts},
            layerwise,
            params,
            base=_base_tensors(job) if layerwise.fit is not None else None,
            max_length=capped_length(params.max_length, model.config, f"method {job.spec.name}"),
            batch_size=params.batch_size,
            progress=progress,
            shared_blocks=model.share_layers,
        )
    if branch_align:
        from guardmerge.merge.branches import branch_align_stage

        result.info["branch_align"] = branch_align_stage(
            model,
            experts,
            {t: x[: fit.examples] for t, x in texts.items()},
            max_length=fit.max_length,
            batch_size=fit.batch_size,
        )
    if align is not None:
        report = align_heads(
            model,
            {e.task: e.folder for e in job.experts},
            texts,
            align,
            feature_cache or FeatureCache(allow_pickle=job.config.allow_pickle),
        )
        result.info["align_heads"] = {"settings": align.model_dump(), "report": report}
    for name, tensor in model.state_tensors().items():
        if name in result.tensors:
            result.tensors[name] = tensor.to(result.tensors[name].dtype)
        elif name.startswith(BRANCH_PREFIX):  # a branch's align, fitted above
            result.tensors[name] = tensor.clone()
    return result


def build(
    config: MergeJob | MergeConfig,
    *,
    progress: bool = True,
    stats: Sequence[ExpertStats] | None = None,
    feature_cache: FeatureCache | None = None,
) -> MergeResult:
    """Run every stage of the job in memory and return the merged result.

    Statistics (for methods that need them) come from ``stats`` when given, else from each
    expert's `stats` file or `data`; the layer-wise solves and head alignment run when the job
    says.
    """
    job = MergeJob.of(config)
    stats = statistics_stage(job, stats, progress)
    result = merge(job, progress=progress, stats=stats)
    return data_stages(job, result, progress=progress, feature_cache=feature_cache)


def merge_to_folder(
    config: MergeJob | MergeConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    stats: Sequence[ExpertStats] | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Run the job and write the output folder atomically (refuses an existing ``out``).

    Without a data stage the merge streams straight to disk, tensor by tensor, into shards of
    at most ``max_shard_bytes``; with one, the model is merged in memory, refined, then written.
    """
    cfg = config.config if isinstance(config, MergeJob) else config
    check_output(out, force=force, inputs=cfg.input_paths())
    job = MergeJob.of(config)
    stats = statistics_stage(job, stats, progress)
    if job.needs_data:
        write_result(
            build(job, progress=progress, stats=stats), out, job.config, force=force, max_shard_bytes=max_shard_bytes
        )
    else:
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


__all__ = [
    "build",
    "compute_stats",
    "data_stages",
    "expert_statistics",
    "merge_to_folder",
    "self_merge_config",
    "statistics_stage",
    "task_texts",
]
