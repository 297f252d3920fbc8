"""The whole merge job: statistics, the tensor merge, head alignment, the output folder.

``engine`` maps a method over tensors; this module strings the steps of a config together so the
CLI, the benchmarks and the search all run the same job.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from guardmerge.config import MergeConfig
from guardmerge.data import read_examples
from guardmerge.engine import MergeResult, merge, write_result
from guardmerge.errors import DataError
from guardmerge.io import check_output
from guardmerge.refit import FeatureCache, align_heads

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


def build(
    config: MergeConfig,
    *,
    progress: bool = True,
    stats: dict[str, dict[str, torch.Tensor]] | None = None,
    feature_cache: FeatureCache | None = None,
) -> MergeResult:
    """Run the merge described by ``config`` and return it in memory."""
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
    stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Run the job and write the output folder atomically (refuses an existing ``out``)."""
    check_output(out, force=force)
    result = build(config, progress=progress, stats=stats)
    write_result(result, out, config, force=force)
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


__all__ = ["build", "merge_to_folder", "self_merge_config", "task_texts"]
