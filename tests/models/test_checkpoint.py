import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardmerge.config import load_config
from guardmerge.errors import CheckpointError
from guardmerge.merge.job import MergeJob
from guardmerge.models.checkpoint import Checkpoint
from tests.builders import copy_expert, edit_config, merge_cfg


def test_prefixed_and_unprefixed_names_map_to_one_canonical_name(zoo: dict[str, Path]) -> None:
    with Checkpoint(zoo["base"]) as base, Checkpoint(zoo["hate"]) as expert:
        name = "encoder.layer.0.attention.self.query.weight"
        assert name in base and name in expert  # stored as `bert.encoder...` in the expert
        assert "classifier.weight" in expert and "classifier.weight" not in base
        assert base.shape(name) == expert.shape(name) == (16, 16)
        assert expert.id2label() == ["not-hate", "hate"]


def test_masked_lm_base_names_are_canonical(tmp_path: Path) -> None:
    from transformers import BertForMaskedLM

    from tests.builders import tiny_config

    BertForMaskedLM(tiny_config()).save_pretrained(str(tmp_path), safe_serialization=True)
    with Checkpoint(tmp_path) as ck:
        assert "encoder.layer.1.output.dense.weight" in ck
        assert ck.adapter.is_ignored("cls.predictions.bias")


def test_reads_one_tensor_lazily_and_exactly(zoo: dict[str, Path]) -> None:
    stored = load_file(str(zoo["hate"] / "model.safetensors"))
    with Checkpoint(zoo["hate"]) as ck:
        assert torch.equal(
            ck.get("embeddings.word_embeddings.weight"), stored["bert.embeddings.word_embeddings.weight"]
        )
        assert ck.get("classifier.bias", torch.float64).dtype == torch.float64


def test_sharded_checkpoint(tmp_path: Path, zoo: dict[str, Path]) -> None:
    state = load_file(str(zoo["hate"] / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(zoo["hate"] / "config.json", folder / "config.json")
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with Checkpoint(folder) as ck, Checkpoint(zoo["hate"]) as ref:
        assert sorted(ck.names()) == sorted(ref.names())
        for name in ref.names():
            assert torch.equal(ck.get(name), ref.get(name))


def test_corrupt_safetensors_is_named(tmp_path: Path, zoo: dict[str, Path]) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(zoo["hate"], folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"corrupt/model.safetensors is not a readable safetensors file"):
        Checkpoint(folder)


def test_pickle_checkpoint_needs_explicit_flag(tmp_path: Path, zoo: dict[str, Path]) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(zoo["hate"] / "config.json", folder / "config.json")
    torch.save(load_file(str(zoo["hate"] / "model.safetensors")), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin is a pickle checkpoint.*--allow-pickle"):
        Checkpoint(folder)
    with Checkpoint(folder, allow_pickle=True) as ck, Checkpoint(zoo["hate"]) as ref:
        assert torch.equal(ck.get("classifier.weight"), ref.get("classifier.weight"))


def test_missing_folder_config_and_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Checkpoint(tmp_path / "does" / "not" / "exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="no weights"):
        Checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "gpt-neo-x"}')
    with pytest.raises(Exception, match="unsupported model_type 'gpt-neo-x'"):
        Checkpoint(tmp_path / "empty")


def test_hub_id_offline_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"'someone/guard-model' is not a local folder.*Hugging Face Hub"):
        Checkpoint("someone/guard-model")


@pytest.mark.parametrize("change", [{"id2label": {"0": "a", "1": "b", "2": "c"}}, {"num_labels": 5}])
def test_label_count_must_match_the_head(tmp_path: Path, zoo: dict[str, Path], change: dict) -> None:
    from guardmerge.merge.stages import merge_to_folder

    bad = copy_expert(zoo["hate"], tmp_path / "bad")
    edit_config(bad, **change)
    cfg = load_config(merge_cfg(tmp_path, zoo, experts=[{"model": str(bad), "task": "hate"}]))
    with pytest.raises(CheckpointError, match=r"expert 'hate'.*declares \d labels but its classifier"):
        merge_to_folder(MergeJob.of(cfg), tmp_path / "out", progress=False)
