"""The statistics stage: each expert's Grams / diagonal Fisher for the methods that need them,
loaded from a statistics file (checked against the expert's fingerprint) or computed from its
unlabelled texts and cached by fingerprint and settings."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from guardmerge.config import StatsConfig
from guardmerge.data import task_texts
from guardmerge.errors import StatisticsError
from guardmerge.merge.engine import sparsified_experts
from guardmerge.merge.job import MergeJob
from guardmerge.models.adapters import capped_length
from guardmerge.models.checkpoint import Checkpoint
from guardmerge.models.head_kinds import head_kind
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
    expert: str | Path | Checkpoint,
    texts: Sequence[str],
    kinds: frozenset[str] | set[str],
    settings: StatsConfig,
    *,
    labels: Sequence[int] | None = None,
    progress: bool = True,
    encoder_state: Mapping[str, torch.Tensor] | None = None,
    allow_pickle: bool = False,
) -> ExpertStats:
    """Run ``expert`` (a folder or hub id, or a merge job's open checkpoint) over ``texts`` and
    collect the statistics ``kinds`` (``gram``, ``fisher``).

    ``encoder_state`` (canonical names) replaces the expert's encoder tensors first: the
    statistics of a sparsified expert (``dare_regmean``). A pickle checkpoint is refused unless
    ``allow_pickle``; ``settings.max_length`` is capped at the model's positions, and texts at
    :data:`~guardmerge.data.MAX_TEXT_CHARS` characters.
    """
    opened = (
        None
        if isinstance(expert, Checkpoint)
        else Checkpoint(expert, allow_pickle=allow_pickle, where=f"expert {expert}")
    )
    with opened or nullcontext(expert) as ck:
        assert isinstance(ck, Checkpoint)
        return _collect(ck, texts, kinds, settings, labels, progress, encoder_state)


def _collect(
    ck: Checkpoint,
    texts: Sequence[str],
    kinds: frozenset[str] | set[str],
    settings: StatsConfig,
    labels: Sequence[int] | None,
    progress: bool,
    encoder_state: Mapping[str, torch.Tensor] | None,
) -> ExpertStats:
    from guardmerge.data import MAX_TEXT_CHARS
    from guardmerge.models.folder import load_tokenizer
    from guardmerge.models.stock import stock_model

    settings = settings.model_copy(
        update={"max_length": capped_length(settings.max_length, ck.config, f"statistics of {ck.where}")}
    )
    token = head_kind(ck.problem).per_token
    if "fisher" in kinds and token:
        raise StatisticsError(
            f"{ck.where} is a token classifier: Fisher statistics are defined for sequence heads only; "
            "merge it with a Gram-based (regmean) or data-free method"
        )
    long = sum(len(t) > MAX_TEXT_CHARS for t in texts)
    if long:
        log.warning("statistics of %s: %d text(s) truncated to %d characters", ck.where, long, MAX_TEXT_CHARS)
        texts = [t[:MAX_TEXT_CHARS] for t in texts]
    tok = load_tokenizer(ck.path, required=True)
    # read as a sequence classifier: Grams read only the encoder's inputs (a token classifier's
    # pooler and head, which it lacks, are initialised by the class and never used)
    fresh = ("pooler.", *ck.adapter.head_prefixes) if token else ()
    model = stock_model(ck, fresh=fresh)
    if encoder_state is not None:
        own = model.state_dict()
        missing = [n for n in encoder_state if ck.adapter.prefixed(n) not in own]
        if missing:
            raise StatisticsError(f"{ck.where}: cannot place sparsified tensor '{missing[0]}'")
        model.load_state_dict({ck.adapter.prefixed(n): t for n, t in encoder_state.items()}, strict=False)
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
    return ExpertStats(fingerprint=expert_fingerprint(ck.path), gram=gram, fisher=fisher, expert=ck.source)


def expert_statistics(
    job: MergeJob, kinds: frozenset[str], *, progress: bool = True, cache: Path | None = None
) -> list[ExpertStats]:
    """Statistics of every expert of ``job``, in config order: loaded from `stats` files (checked
    against the expert's fingerprint) or computed from `data` on the job's open checkpoints and
    cached by fingerprint and settings."""
    with job.open(progress):
        return _expert_statistics(job, kinds, progress, cache or default_cache_dir() / "stats")


def _expert_statistics(job: MergeJob, kinds: frozenset[str], progress: bool, cache: Path) -> list[ExpertStats]:
    config = job.config
    out = []
    states = None
    variant: dict[str, object] = {}
    if job.spec.sparsify is not None:  # statistics of the sparsified experts (docs/algorithms.md 2)
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
            fingerprint, kinds=sorted(kinds), texts=text_digest(texts), **config.statistics.model_dump()
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
            job.checkpoint(e.task),
            texts,
            kinds,
            config.statistics,
            progress=progress,
            encoder_state=states[i] if states is not None else None,
        )
        stats.fingerprint = fingerprint
        save_stats(path, gram=stats.gram, fisher=stats.fisher, fingerprint=fingerprint, expert=e.source)
        out.append(stats)
    return out


def text_digest(texts: Sequence[str]) -> str:
    """A short digest of ``texts`` in order (part of the statistics and heal cache keys)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()[:16]


def statistics_stage(
    job: MergeJob, stats: Sequence[ExpertStats] | None = None, progress: bool = True
) -> Sequence[ExpertStats] | None:
    """Stage 1: ``stats`` if given, else the experts' statistics when the method needs some
    (``job`` open)."""
    if job.statistics and stats is None:
        return expert_statistics(job, job.statistics, progress=progress)
    return stats


def write_expert_stats(
    expert: str,
    data: Path,
    out: Path,
    kinds: set[str],
    settings: StatsConfig,
    *,
    text_field: str = "text",
    label_field: str = "label",
    force: bool = False,
    allow_pickle: bool = False,
) -> int:
    """``guardmerge stats``: an expert's statistics on the texts of ``data`` (a JSONL/CSV/TXT file
    or a task folder), written to ``out`` tied to the expert by fingerprint; the number of texts."""
    from guardmerge.data import read_examples

    unknown = sorted(kinds - {"gram", "fisher"})
    if unknown:
        raise StatisticsError(f"unknown statistics kind(s) {unknown}: use gram and/or fisher")
    labels = None
    if data.is_file():
        ex = read_examples(data, text_field=text_field, label_field=label_field).head(settings.examples)
        texts, labels = ex.texts, ex.labels
    else:
        texts = task_texts(data, settings.examples)
    if settings.fisher_labels == "empirical" and "fisher" in kinds and labels is None:
        raise StatisticsError(f"empirical Fisher needs gold labels: no integer '{label_field}' in {data}")
    result = compute_stats(expert, texts, kinds, settings, labels=labels, allow_pickle=allow_pickle)
    save_stats(
        out,
        gram=result.gram,
        fisher=result.fisher,
        fingerprint=result.fingerprint,
        expert=expert,
        extra={"data": str(data), "examples": len(texts)},
        force=force,
    )
    return len(texts)
