"""The one checked reader of a model folder: finder, links, dtypes, NaN (issue 21)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardmerge.config import load_config
from guardmerge.errors import CheckpointError
from guardmerge.io.checkpoint import CheckpointFiles, dtype_problem
from guardmerge.io.formats import input_files, read_config, weight_files
from guardmerge.merge.job import MergeJob
from guardmerge.models.checkpoint import Checkpoint
from tests.builders import copy_expert, edit_config, edit_weights, merge_cfg


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit(folder: Path, fn) -> None:  # type: ignore[no-untyped-def]
    state = load_file(str(folder / "model.safetensors"))
    fn(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_reads_every_tensor_checked(zoo: dict[str, Path]) -> None:
    stored = load_file(str(zoo["hate"] / "model.safetensors"))
    with CheckpointFiles(zoo["hate"]) as ck:
        assert set(ck.stored_names()) == set(stored)
        for key, value in ck.state_dict().items():
            assert torch.equal(value, stored[key])


@pytest.mark.parametrize(
    ("dtype", "problem"),
    [
        (torch.int8, "quantised"),
        (torch.uint8, "quantised"),
        (torch.bool, "must be floating point"),
        (torch.int32, "must be floating point"),
        (torch.float8_e4m3fn, "quantised format"),
        (torch.float8_e5m2, "quantised format"),
    ],
)
def test_non_float_and_fp8_tensors_are_refused(
    tmp_path: Path, zoo: dict[str, Path], dtype: torch.dtype, problem: str
) -> None:
    folder = copy(zoo["hate"], tmp_path / "e")
    edit(folder, lambda s: s.__setitem__("classifier.weight", s["classifier.weight"].to(dtype)))
    with pytest.raises(CheckpointError, match=f"'classifier.weight'.*{problem}"):
        CheckpointFiles(folder)


def test_integer_index_buffers_are_allowed() -> None:
    assert dtype_problem("bert.embeddings.position_ids", torch.int64) is None
    assert dtype_problem("bert.embeddings.token_type_ids", torch.int64) is None
    assert dtype_problem("bert.embeddings.word_embeddings.weight", torch.int64) is not None


def test_nan_is_refused_on_read_naming_the_tensor(tmp_path: Path, zoo: dict[str, Path]) -> None:
    folder = copy(zoo["hate"], tmp_path / "e")
    edit(folder, lambda s: s["bert.pooler.dense.bias"].__setitem__(0, float("nan")))
    with CheckpointFiles(folder) as ck, pytest.raises(CheckpointError, match="'bert.pooler.dense.bias' holds NaN"):
        ck.state_dict()


def test_a_weights_link_that_leaves_the_folder_is_refused_without_opening_it(
    tmp_path: Path, zoo: dict[str, Path]
) -> None:
    folder = copy(zoo["hate"], tmp_path / "e")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(zoo["injection"] / "model.safetensors")  # a real safetensors file
    with pytest.raises(CheckpointError, match="resolves outside the model folder") as info:
        CheckpointFiles(folder)
    assert "classifier" not in str(info.value)  # none of the target's tensor names


def test_a_hub_snapshot_may_link_into_its_blobs(tmp_path: Path, zoo: dict[str, Path]) -> None:
    repo = tmp_path / "models--org--hate"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in zoo["hate"].iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        (snapshot / f.name).symlink_to(os.path.relpath(blobs / f"blob-{f.name}", snapshot))
    with CheckpointFiles(snapshot) as ck:
        assert "classifier.weight" in ck.stored_names()
    outputs = {p.name for p in input_files([snapshot])}
    assert "blob-model.safetensors" in outputs  # what an output must not touch


def test_shard_index_outside_the_folder_is_refused(tmp_path: Path, zoo: dict[str, Path]) -> None:
    folder = copy(zoo["hate"], tmp_path / "e")
    keys = list(load_file(str(folder / "model.safetensors")))
    shutil.move(str(folder / "model.safetensors"), str(tmp_path / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(keys, "../outside.safetensors")})
    )
    with pytest.raises(CheckpointError, match="outside the model folder"):
        weight_files(folder)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"auto_map": {"AutoModel": "modeling_evil.EvilModel"}}, "auto_map"),
        ({"custom_pipelines": {"x": {"impl": "evil.Pipe"}}}, "custom_pipelines"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantised"),
        ({"model_type": 5}, "model_type"),
    ],
)
def test_config_with_code_hints_or_quantisation_is_refused(
    tmp_path: Path, zoo: dict[str, Path], change: dict, problem: str
) -> None:
    folder = copy(zoo["hate"], tmp_path / "e")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=problem):
        read_config(folder)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b"[" * 100_000, b"[1, 2]", b'{"model_type": 1e400}'])
def test_binary_nested_or_non_object_config_is_one_clean_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError):
        read_config(tmp_path)


@pytest.mark.parametrize(
    ("dtype", "match"),
    [
        (torch.int8, "quantised"),
        (torch.uint8, "quantised"),
        (torch.bool, "must be floating point"),
        (torch.int32, "must be floating point"),
    ],
)
def test_non_float_weights_refused(tmp_path: Path, zoo: dict[str, Path], dtype: torch.dtype, match: str) -> None:
    from guardmerge.merge.stages import merge_to_folder

    bad = copy_expert(zoo["hate"], tmp_path / "bad")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    edit_weights(bad, lambda s: s.__setitem__(key, (s[key] * 100).to(dtype)))
    cfg = load_config(merge_cfg(tmp_path, zoo, experts=[{"model": str(bad), "task": "hate"}]))
    with pytest.raises(CheckpointError, match=rf"expert 'hate'.*{key}.*{match}"):
        merge_to_folder(MergeJob.of(cfg), tmp_path / "out", progress=False)


def test_quantised_checkpoints_refused(tmp_path: Path, zoo: dict[str, Path]) -> None:
    q = copy_expert(zoo["hate"], tmp_path / "q")
    edit_config(q, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(CheckpointError, match="quantization_config"):
        Checkpoint(q)
    g = copy_expert(zoo["hate"], tmp_path / "g")
    edit_weights(g, lambda s: s.__setitem__("bert.encoder.layer.0.attention.self.query.qweight", torch.zeros(4, 4)))
    with pytest.raises(CheckpointError, match=r"query.qweight.*quantised"):
        Checkpoint(g)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_shard_paths_outside_the_folder_refused(
    tmp_path: Path, zoo: dict[str, Path], merged_folder: Path, shard: str
) -> None:
    import guardmerge

    shutil.copy(zoo["hate"] / "model.safetensors", tmp_path / "outside.safetensors")
    for src in (zoo["hate"], merged_folder):
        folder = copy_expert(src, tmp_path / src.name)
        keys = list(load_file(str(folder / "model.safetensors")))
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, shard)}))
        with pytest.raises(CheckpointError, match="outside the model folder"):
            Checkpoint(folder) if src == zoo["hate"] else guardmerge.load(str(folder))
        shutil.rmtree(folder)


def test_a_binary_or_deeply_nested_config_json_gives_a_clean_error(tmp_path: Path, zoo: dict[str, Path]) -> None:
    model = copy_expert(zoo["hate"], tmp_path / "binconfig")
    (model / "config.json").write_bytes(b"\xff\xd8\xff\xe0" * 10)
    with pytest.raises(CheckpointError, match="not UTF-8 text"):
        Checkpoint(model)
    (model / "config.json").write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        Checkpoint(model)
