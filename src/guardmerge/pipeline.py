"""The whole merge job: statistics, the tensor merge, head alignment, the output folder.

``engine`` maps a method over tensors; this module strings the steps of a config together so the
CLI, the benchmarks and the search all run the same job.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from guardmerge.architectures import get_adapter
from guardmerge.checkpoint import resolve
from guardmerge.config import MergeConfig, StatsConfig
from guardmerge.data import read_examples
from guardmerge.engine import (
    MergeResult,
    merge,
    sparsified_experts,
    stream_to_folder,
    write_result,
)
from guardmerge.errors import DataError, StatisticsError
from guardmerge.io import check_output
from guardmerge.methods import METHODS
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


def task_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Unlabelled texts from a data file, or from a task folder's ``train.jsonl``."""
    p = Path(path)
    if p.is_dir():
        p = p / "train.jsonl"
        if not p.is_file():
            raise DataError(f"{p.parent}: a task folder needs train.jsonl")
    texts = read_examples(p, label_field=None).texts
    return texts[:limit] if limit else texts


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
) -> ExpertStats:
    """Run ``expert`` over ``texts`` and collect the statistics ``kinds`` (``gram``, ``fisher``).

    ``encoder_state`` (canonical names) replaces the expert's encoder tensors first: the
    statistics of a sparsified expert (``dare_regmean``).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = resolve(expert)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    if encoder_state is not None:
        adapter = get_adapter(model.config.model_type)
        own = model.state_dict()
        missing = [n for n in encoder_state if adapter.prefixed(n) not in own]
        if missing:
            raise StatisticsError(f"{expert}: cannot place sparsified tensor '{missing[0]}'")
        model.load_state_dict({adapter.prefixed(n): t for n, t in encoder_state.items()}, strict=False)
    batches = tokenize_batches(
        tok, list(texts), labels=labels, batch_size=settings.batch_size,
        max_length=settings.max_length, sort_by_length=True,
    )
    gram = fisher = None
    if "gram" in kinds:
        gram = collect_grams(model, batches, include_padding=settings.include_padding,
                             max_length=settings.max_length, progress=progress)
    if "fisher" in kinds:
        fisher = collect_fisher(model, batches, label_mode=settings.fisher_labels,
                                gradient=settings.fisher_gradient, max_length=settings.max_length,
                                progress=progress)
    return ExpertStats(fingerprint=expert_fingerprint(folder), gram=gram, fisher=fisher, expert=str(expert))


def expert_statistics(
    config: MergeConfig, kinds: frozenset[str], *, progress: bool = True, cache: Path | None = None
) -> list[ExpertStats]:
    """Statistics of every expert, in config order: loaded from `stats` files (checked against
    the expert's fingerprint) or computed from `data` and cached by fingerprint and settings."""
    out = []
    cache = cache or default_cache_dir() / "stats"
    spec = METHODS.get(config.method)
    states = None
    variant: dict[str, object] = {}
    if spec.sparsify is not None:  # statistics of the sparsified experts (ALGORITHMS.md 2)
        variant = {"sparsified_by": config.method, "seed": config.seed, **config.method_params().model_dump()}
    for i, e in enumerate(config.experts):
        fingerprint = expert_fingerprint(resolve(e.model))
        if variant:
            fingerprint = derive_fingerprint(fingerprint, **variant)
        if e.stats:
            out.append(load_stats(e.stats, fingerprint=fingerprint, kinds=sorted(kinds)))
            continue
        if not e.data:
            raise StatisticsError(f"expert '{e.task}' has neither `stats` nor `data`")
        texts = task_texts(e.data, config.statistics.examples)
        key = derive_fingerprint(fingerprint, kinds=sorted(kinds), texts=_text_digest(texts),
                                 **config.statistics.model_dump())
        path = cache / f"{e.task}-{key.split(':')[-1][:16]}.safetensors"
        if path.is_file():
            log.info("statistics of '%s': cached %s", e.task, path)
            out.append(load_stats(path, fingerprint=fingerprint, kinds=sorted(kinds)))
            continue
        log.info("statistics of '%s': computing %s on %d texts", e.task, "+".join(sorted(kinds)), len(texts))
        if variant and states is None:
            states = sparsified_experts(config)
        stats = compute_stats(e.model, texts, kinds, config.statistics, progress=progress,
                              encoder_state=states[i] if states is not None else None)
        stats.fingerprint = fingerprint
        save_stats(path, gram=stats.gram, fisher=stats.fisher, fingerprint=fingerprint, expert=e.model)
        out.append(stats)
    return out


def _text_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()[:16]


def _statistics(config: MergeConfig, stats: Sequence[ExpertStats] | None, progress: bool) -> Sequence[ExpertStats] | None:
    """``stats`` if given, else the experts' statistics when the method needs some (else None)."""
    needs = METHODS.get(config.method).needs
    if needs and stats is None:
        return expert_statistics(config, needs, progress=progress)
    return stats


def build(
    config: MergeConfig,
    *,
    progress: bool = True,
    stats: Sequence[ExpertStats] | None = None,
    feature_cache: FeatureCache | None = None,
) -> MergeResult:
    """Run the merge described by ``config`` and return it in memory.

    Statistics (for methods that need them) come from ``stats`` when given, else from each
    expert's `stats` file or `data`; head alignment runs when :meth:`MergeConfig.alignment` says.
    """
    stats = _statistics(config, stats, progress)
    align = config.alignment()
    texts = {e.task: task_texts(e.data, align.examples) for e in config.experts} if align else {}
    result = merge(config, progress=progress, stats=stats)
    if align:
        model = result.to_model()
        report = align_heads(model, {e.task: e.model for e in config.experts}, texts, align, feature_cache)
        for task in report:
            result.tensors.update(model.heads[task].state(task))  # type: ignore[operator]
        result.info["align_heads"] = {"settings": align.model_dump(), "report": report}
    return result


def merge_to_folder(
    config: MergeConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    stats: Sequence[ExpertStats] | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Run the job and write the output folder atomically (refuses an existing ``out``).

    Without head alignment the merge streams straight to disk, tensor by tensor, into shards of
    at most ``max_shard_bytes``; with it, the model is merged in memory, aligned, then written.
    """
    check_output(out, force=force)
    stats = _statistics(config, stats, progress)
    if config.alignment() is None:
        stream_to_folder(config, out, force=force, progress=progress, stats=stats, max_shard_bytes=max_shard_bytes)
    else:
        result = build(config, progress=progress, stats=stats)
        write_result(result, out, config, force=force, max_shard_bytes=max_shard_bytes)
    return Path(out)


def self_merge_config(
    base: str, expert: str, method: str, parameters: dict | None = None, *, task: str = "task", seed: int = 0
) -> MergeConfig:
    """HM3 self-merging: one expert against its base, ``theta_0 + scaling * sparsify(tau)``."""
    from guardmerge.config import parse_config

    return parse_config({
        "base_model": base,
        "experts": [{"model": expert, "task": task}],
        "method": method,
        "parameters": dict(parameters or {}),
        "seed": seed,
        "align_heads": False,
    }, source="self-merge")


__all__ = ["build", "compute_stats", "expert_statistics", "merge_to_folder", "self_merge_config", "task_texts"]
