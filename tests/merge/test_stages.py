"""The whole merge (guardmerge.merge.stages): the stages declared once in run order, which of them a
job asks for, ``build`` in memory and ``merge_to_folder`` on disk giving the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import guardmerge
from guardmerge.config import load_config
from guardmerge.errors import CheckpointError
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.merge.stages import STAGES, build, merge_to_folder
from tests.builders import TEXTS, merge_cfg, pickle_only, texts_jsonl, zoo_merge_config


def test_the_stages_are_declared_in_the_order_they_run() -> None:
    assert [s.name for s in STAGES] == [
        "statistics",
        "tensor merge",
        "layer-wise solves",
        "branch alignment",
        "heal",
        "head alignment",
    ]


def asked(job: MergeJob) -> list[str]:
    with job.open():  # branch alignment reads the plan
        return [s.name for s in STAGES if s.applies(job)]


def test_each_job_runs_the_stages_it_asks_for(zoo: dict[str, Path], tmp_path: Path) -> None:
    data = texts_jsonl(tmp_path)
    assert asked(MergeJob.of(zoo_merge_config(zoo))) == ["tensor merge"]
    assert asked(MergeJob.of(zoo_merge_config(zoo, data, align_heads=True))) == ["tensor merge", "head alignment"]
    assert asked(MergeJob.of(zoo_merge_config(zoo, data, method="regmean", parameters={}))) == [
        "statistics",
        "tensor merge",
    ]
    assert asked(MergeJob.of(zoo_merge_config(zoo, data, method="lot", parameters={}))) == [
        "tensor merge",
        "layer-wise solves",
    ]
    branched = zoo_merge_config(zoo, data, share_layers=1, branch_align=True)
    assert asked(MergeJob.of(branched)) == ["tensor merge", "branch alignment"]
    every_layer = zoo_merge_config(zoo, data, share_layers=2, branch_align=True)  # no branch left to align
    assert asked(MergeJob.of(every_layer)) == ["tensor merge"]
    healed = zoo_merge_config(zoo, data, method="lot", parameters={}, heal={}, align_heads=True)
    assert asked(MergeJob.of(healed)) == ["tensor merge", "layer-wise solves", "heal", "head alignment"]


def test_without_a_data_stage_build_is_the_tensor_merge_and_the_folder_holds_it(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    job = MergeJob.of(zoo_merge_config(zoo))
    built, merged = build(job, progress=False), merge(job, progress=False)
    assert set(built.tensors) == set(merged.tensors)
    assert all(torch.equal(built.tensors[n], merged.tensors[n]) for n in merged.tensors)
    out = merge_to_folder(job, tmp_path / "out", progress=False)  # streamed straight to disk
    a, b = guardmerge.load(str(out)).logits(TEXTS), built.to_model().logits(TEXTS)
    assert set(a) == set(b) and all(torch.allclose(a[t], b[t], atol=1e-6) for t in a)


def test_with_head_alignment_the_folder_holds_the_aligned_heads(zoo: dict[str, Path], tmp_path: Path) -> None:
    config = zoo_merge_config(zoo, texts_jsonl(tmp_path), align_heads=True)
    built = build(MergeJob.of(config), progress=False)
    plain = merge(MergeJob.of(config), progress=False)
    head = "heads.hate.classifier.weight"
    assert not torch.equal(built.tensors[head], plain.tensors[head])  # the alignment changed the head
    out = merge_to_folder(MergeJob.of(config), tmp_path / "out", progress=False)
    a, b = guardmerge.load(str(out)).logits(TEXTS), built.to_model().logits(TEXTS)
    assert all(torch.allclose(a[t], b[t], atol=1e-6) for t in a)


@pytest.mark.parametrize("mode", ["regmean", "align", "layerwise"])
def test_pickle_only_expert_refused_by_data_stages(tmp_path: Path, zoo: dict[str, Path], mode: str) -> None:
    from guardmerge.merge.stages import merge_to_folder

    expert = pickle_only(zoo["hate"], tmp_path / "pickled")
    data = texts_jsonl(tmp_path)
    experts = [
        {"model": str(expert), "task": "hate", "data": str(data)},
        {"model": str(zoo["sentiment"]), "task": "sentiment", "data": str(data)},
    ]
    method = {
        "regmean": ("regmean", {}),
        "align": ("task_arithmetic", {"scaling": 0.5}),
        "layerwise": ("regmean_pp", {}),
    }[mode]
    over = {"align_heads": False} if mode != "align" else {}
    cfg = load_config(merge_cfg(tmp_path, zoo, experts=experts, method=method[0], parameters=method[1], **over))
    with pytest.raises(CheckpointError, match="pickle checkpoint"):
        merge_to_folder(MergeJob.of(cfg), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
