"""The one output path of every merge (guardmerge.merge.write): tensors, config, tokenizer, merge
config and model card in a temporary folder, the model probed as a user loads it, then put in place;
an existing output is refused without ``force``; nothing is left behind when a write fails."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

import guardmerge
from guardmerge.config import MergeConfig, load_config, parse_config
from guardmerge.errors import GuardmergeError, OutputError, OutputExistsError
from guardmerge.io.formats import CONFIG_FILE, MERGE_CONFIG_FILE, MODEL_CARD_FILE
from guardmerge.io.writer import TensorSlot
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.merge.result import MergeResult
from guardmerge.merge.write import write_folder
from tests.builders import TEXTS, merge_cfg


@pytest.fixture(scope="module")
def two_head_merge(zoo: dict[str, Path]) -> tuple[MergeResult, MergeConfig]:
    config = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo[t]), "task": t} for t in ("hate", "sentiment")],
            "parameters": {"scaling": 0.4},
        }
    )
    return merge(MergeJob.of(config), progress=False), config


def _write(out: Path, result: MergeResult, config: MergeConfig, **kwargs: object) -> None:
    layout = [TensorSlot(n, t.dtype, tuple(t.shape)) for n, t in result.tensors.items()]
    write_folder(out, result, config, result.tensors.items(), layout, **kwargs)  # type: ignore[arg-type]


def test_the_folder_holds_weights_config_tokenizer_merge_config_and_card(
    two_head_merge: tuple[MergeResult, MergeConfig], tmp_path: Path
) -> None:
    result, config = two_head_merge
    out = tmp_path / "out"
    _write(out, result, config, extra_files={"search.json": b"{}"})
    names = {p.name for p in out.iterdir()}
    assert {CONFIG_FILE, "model.safetensors", "tokenizer.json", MERGE_CONFIG_FILE, MODEL_CARD_FILE} <= names
    assert "search.json" in names and not any(n.startswith(".") for n in names)  # no temporary marker left
    assert json.loads((out / CONFIG_FILE).read_text())["guardmerge"]["heads"].keys() == {"hate", "sentiment"}
    assert "task_arithmetic" in (out / MODEL_CARD_FILE).read_text()
    loaded = guardmerge.load(str(out))  # read back as a user reads it: the same heads and logits
    ref = result.to_model().logits(TEXTS)
    got = loaded.logits(TEXTS)
    assert set(got) == {"hate", "sentiment"}
    assert all(torch.allclose(got[t], ref[t], atol=1e-6) for t in got)


def test_an_existing_output_is_refused_unless_forced(
    two_head_merge: tuple[MergeResult, MergeConfig], tmp_path: Path
) -> None:
    result, config = two_head_merge
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError):
        _write(out, result, config)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    _write(out, result, config, force=True)
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()


def test_a_non_finite_tensor_is_refused_and_nothing_is_written(
    two_head_merge: tuple[MergeResult, MergeConfig], tmp_path: Path
) -> None:
    result, config = two_head_merge
    tensors = dict(result.tensors)
    name = "encoder.layer.0.output.dense.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    bad = MergeResult(tensors, result.config, result.heads, result.info, result.tokenizer_dir)
    with pytest.raises(GuardmergeError, match=rf"merged tensor '{name}' holds NaN or Inf.*nothing was written"):
        _write(tmp_path / "out", bad, config)
    assert list(tmp_path.iterdir()) == []


def test_nonfinite_merged_tensor_stops_the_write(tmp_path: Path, zoo: dict[str, Path]) -> None:
    from guardmerge.merge.stages import merge_to_folder

    cfg = load_config(
        merge_cfg(tmp_path, zoo, parameters={"scaling": 1.0}, out_dtype="float16"),
        ["experts.0.weight=1.0e8", "experts.1.weight=1.0e8"],
    )  # finite, but overflows float16
    with pytest.raises(GuardmergeError, match=r"merged tensor '.*' holds NaN or Inf"):
        merge_to_folder(MergeJob.of(cfg), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]  # no output, no temporary folder


def test_disk_full_becomes_an_error_naming_the_output(
    tmp_path: Path, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from guardmerge.merge import write as engine
    from guardmerge.merge.stages import merge_to_folder

    real = engine._copy_tokenizer

    def full(*a: object, **k: object) -> None:  # the disk fills while the tokenizer is copied in
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine, "_copy_tokenizer", full)
    with pytest.raises(OutputError, match=r"cannot write output '.*out': No space left on device"):
        merge_to_folder(MergeJob.of(load_config(merge_cfg(tmp_path, zoo))), tmp_path / "out", progress=False)
    monkeypatch.setattr(engine, "_copy_tokenizer", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_the_output_probe_runs_only_when_merged_weights_leave_the_inputs_range(
    two_head_merge: tuple[MergeResult, MergeConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guardmerge.merge import write

    result, config = two_head_merge
    largest = max(float(t.abs().max()) for t in result.tensors.values() if t.is_floating_point())
    probed: list[Path] = []
    monkeypatch.setattr(write, "probe_outputs", lambda folder, **_: probed.append(folder))
    _write(tmp_path / "inside", result, config, input_abs_max=lambda: largest)
    assert probed == []  # every merged weight within the inputs' range: no model load
    _write(tmp_path / "outside", result, config, input_abs_max=lambda: largest * 0.999)
    _write(tmp_path / "unknown", result, config)  # no input range given: always probed
    assert len(probed) == 2


def test_a_streamed_merge_tracks_its_inputs_range_and_probes_an_amplified_merge(
    zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guardmerge.merge import write
    from guardmerge.merge.stages import merge_to_folder

    probed: list[Path] = []
    real = write.probe_outputs
    monkeypatch.setattr(write, "probe_outputs", lambda folder, **kw: (probed.append(folder), real(folder, **kw)))
    experts = [{"model": str(zoo[t]), "task": t} for t in ("hate", "sentiment")]
    for scaling in (0.4, 40.0):
        cfg = parse_config(
            {"base_model": str(zoo["base"]), "experts": experts, "parameters": {"scaling": scaling}}
            | {"align_heads": False}
        )
        merge_to_folder(MergeJob.of(cfg), tmp_path / f"s{scaling}", progress=False)
    assert len(probed) == 1 and "s40.0" in str(probed[0])  # scaling 40 leaves the range: probed and finite
    assert guardmerge.load(str(tmp_path / "s0.4")).logits(TEXTS)["hate"].isfinite().all()
