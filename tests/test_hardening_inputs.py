"""Security review, issue 17: hostile or broken inputs are refused with one clean error.

Each test reproduces one defect (it failed before the fix) and checks that inputs are intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from guardmerge.cli import main
from guardmerge.config import load_config
from guardmerge.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GuardmergeError,
    OutputError,
)
from guardmerge.merge.job import MergeJob
from guardmerge.models.checkpoint import Checkpoint
from tests.builders import TEXTS

# -- helpers -------------------------------------------------------------------------------


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the console entry point in-process (for refusals: a success of merge exits the process)."""
    monkeypatch.setattr(sys, "argv", ["guardmerge", *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    return int(info.value.code or 0), err


def assert_clean_refusal(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def copy_expert(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(folder: Path, fn) -> None:
    state = load_file(str(folder / "model.safetensors"))
    fn(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def merge_cfg(tmp_path: Path, zoo: dict[str, Path], name: str = "merge.yaml", **over: object) -> Path:
    data: dict = {
        "base_model": str(zoo["base"]),
        "experts": [{"model": str(zoo["hate"]), "task": "hate"}, {"model": str(zoo["sentiment"]), "task": "sentiment"}],
        "method": "task_arithmetic",
        "parameters": {"scaling": 0.5},
    }
    data.update(over)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def pickle_only(src: Path, dst: Path) -> Path:
    """``src`` re-saved with only pytorch_model.bin (a pickle), config and tokenizer kept."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    return dst


@pytest.fixture(scope="module")
def merged(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from guardmerge.merge.stages import merge_to_folder

    root = tmp_path_factory.mktemp("merged")
    out = root / "m"
    merge_to_folder(MergeJob.of(load_config(merge_cfg(root, zoo))), out, progress=False)
    return out


def data_file(tmp_path: Path, name: str = "texts.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


# -- 2: NaN / Inf --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override", ["parameters.scaling=.nan", "experts.0.weight=.nan", "experts.1.weight=.inf", "align_heads.ridge=.inf"]
)
def test_nonfinite_config_values_refused(tmp_path: Path, zoo: dict[str, Path], override: str) -> None:
    from guardmerge.merge.job import MergeJob

    with pytest.raises(ConfigError, match=r"finite"):
        MergeJob.of(load_config(merge_cfg(tmp_path, zoo), [override]))


def test_nonfinite_method_parameter_refused_for_every_method() -> None:
    from guardmerge.methods import METHODS

    checked = 0
    for spec in METHODS:
        for pname, finfo in spec.params.model_fields.items():
            if finfo.annotation is float:
                with pytest.raises(ConfigError, match="finite"):
                    spec.validate({pname: float("nan")})
                checked += 1
    assert checked >= 5


def test_zero_sum_weights_refused_up_front(tmp_path: Path, zoo: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="sum to 0"):
        load_config(
            merge_cfg(tmp_path, zoo, method="average", parameters={}), ["experts.0.weight=1.0", "experts.1.weight=-1.0"]
        )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_expert_with_nonfinite_weights_refused(tmp_path: Path, zoo: dict[str, Path], value: float) -> None:
    from guardmerge.merge.stages import merge_to_folder

    bad = copy_expert(zoo["hate"], tmp_path / "bad")
    edit_weights(bad, lambda s: s["bert.encoder.layer.1.output.dense.weight"].view(-1).__setitem__(3, value))
    cfg = load_config(
        merge_cfg(
            tmp_path,
            zoo,
            experts=[{"model": str(bad), "task": "hate"}, {"model": str(zoo["sentiment"]), "task": "sentiment"}],
        )
    )
    with pytest.raises(CheckpointError, match=r"expert 'hate'.*encoder.layer.1.output.dense.weight.*NaN or Inf"):
        merge_to_folder(MergeJob.of(cfg), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_nonfinite_merged_tensor_stops_the_write(tmp_path: Path, zoo: dict[str, Path]) -> None:
    from guardmerge.merge.stages import merge_to_folder

    cfg = load_config(
        merge_cfg(tmp_path, zoo, parameters={"scaling": 1.0}, out_dtype="float16"),
        ["experts.0.weight=1.0e8", "experts.1.weight=1.0e8"],
    )  # finite, but overflows float16
    with pytest.raises(GuardmergeError, match=r"merged tensor '.*' holds NaN or Inf"):
        merge_to_folder(MergeJob.of(cfg), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]  # no output, no temporary folder


def test_load_refuses_nonfinite_weights(tmp_path: Path, merged: Path) -> None:
    import guardmerge

    bad = copy_expert(merged, tmp_path / "bad")
    edit_weights(bad, lambda s: s["heads.hate.classifier.bias"].__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match=r"heads.hate.classifier.bias.*NaN or Inf"):
        guardmerge.load(str(bad))


# -- 3: --force never destroys an input ------------------------------------------------------


@pytest.fixture
def own_zoo(tmp_path: Path, zoo: dict[str, Path]) -> dict[str, Path]:
    """A private copy of the zoo in one folder (so a refusal can be checked against its contents)."""
    root = tmp_path / "models"
    return {k: copy_expert(v, root / k) for k, v in zoo.items()}


def test_merge_force_onto_an_input_refused(
    tmp_path: Path, own_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = merge_cfg(tmp_path, own_zoo)
    before = digest(tmp_path / "models")
    for out, how in (
        (own_zoo["hate"], "is the input"),
        (tmp_path / "models", "contains the input"),
        (own_zoo["base"] / "sub", "lies inside the input"),
        (tmp_path, "contains the input"),
    ):
        code, err = run_cli(monkeypatch, capsys, "merge", str(cfg), str(out), "--force", "--no-progress")
        assert_clean_refusal(code, err, how)
    assert digest(tmp_path / "models") == before and cfg.is_file()


def test_out_dot_with_force_refused(
    tmp_path: Path, own_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = merge_cfg(tmp_path / "models", own_zoo)
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    code, err = run_cli(monkeypatch, capsys, "merge", str(cfg), ".", "--force", "--no-progress")
    assert_clean_refusal(code, err, "working directory")
    assert (work / "keep.txt").read_text() == "mine"


def test_export_and_onnx_onto_their_source_refused(
    tmp_path: Path, merged: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = copy_expert(merged, tmp_path / "m")
    before = digest(src)
    for args in (
        ["export", str(src), "hate", str(src), "--force"],
        ["export-onnx", str(src), str(src), "--force"],
        ["export", str(src), "hate", str(src / "inner"), "--force"],
    ):
        code, err = run_cli(monkeypatch, capsys, *args)
        assert_clean_refusal(code, err, "input")
    assert digest(src) == before


def test_stats_out_onto_expert_weights_refused(
    tmp_path: Path, own_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = data_file(tmp_path)
    before = digest(own_zoo["hate"])
    code, err = run_cli(
        monkeypatch,
        capsys,
        "stats",
        str(own_zoo["hate"]),
        "--data",
        str(data),
        "--out",
        str(own_zoo["hate"] / "model.safetensors"),
        "--force",
    )
    assert_clean_refusal(code, err, "lies inside the input")
    code, err = run_cli(
        monkeypatch, capsys, "stats", str(own_zoo["hate"]), "--data", str(data), "--out", str(data), "--force"
    )
    assert_clean_refusal(code, err, "is the input")
    assert digest(own_zoo["hate"]) == before and data.read_text().count("\n") == len(TEXTS)


def test_self_merge_finetune_search_eval_onto_inputs_refused(
    tmp_path: Path, own_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = data_file(tmp_path)
    before = digest(tmp_path / "models")
    cases = [
        ["self-merge", str(own_zoo["base"]), str(own_zoo["hate"]), str(own_zoo["hate"]), "--force"],
        ["finetune", str(own_zoo["base"]), str(data), str(own_zoo["base"]), "--labels", "a,b", "--force"],
        ["finetune", str(own_zoo["base"]), str(data), str(tmp_path), "--labels", "a,b", "--force"],
        [
            "search",
            str(merge_cfg(tmp_path, own_zoo)),
            "--data",
            str(tmp_path),
            "--out",
            str(own_zoo["sentiment"]),
            "--force",
        ],
        ["eval", str(own_zoo["hate"]), "--data", str(tmp_path), "--out", str(data)],
    ]
    for args in cases:
        code, err = run_cli(monkeypatch, capsys, *args)
        assert_clean_refusal(code, err, "input")
    assert digest(tmp_path / "models") == before and data.read_text().count("\n") == len(TEXTS)


# -- 5: no pickle is read without allow_pickle -----------------------------------------------


def test_pickle_only_expert_refused_by_stats_unless_allowed(
    tmp_path: Path, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    expert = pickle_only(zoo["hate"], tmp_path / "pickled")
    data = data_file(tmp_path)
    calls: list[str] = []
    real = transformers.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForSequenceClassification,
        "from_pretrained",
        lambda *a, **k: calls.append(str(a[0])) or real(*a, **k),
    )
    code, err = run_cli(monkeypatch, capsys, "stats", str(expert), "--data", str(data), "--out", str(tmp_path / "s.st"))
    assert_clean_refusal(code, err, "pytorch_model.bin is a pickle checkpoint")
    assert calls == [] and not (tmp_path / "s.st").exists()
    from typer.testing import CliRunner

    from guardmerge.cli import app

    res = CliRunner().invoke(
        app, ["stats", str(expert), "--data", str(data), "--out", str(tmp_path / "s.st"), "--allow-pickle"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s.st").is_file()


@pytest.mark.parametrize("mode", ["regmean", "align", "layerwise"])
def test_pickle_only_expert_refused_by_data_stages(tmp_path: Path, zoo: dict[str, Path], mode: str) -> None:
    from guardmerge.merge.stages import merge_to_folder

    expert = pickle_only(zoo["hate"], tmp_path / "pickled")
    data = data_file(tmp_path)
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


def test_every_checkpoint_opener_refuses_pickle(tmp_path: Path, zoo: dict[str, Path]) -> None:
    from guardmerge.config import StatsConfig
    from guardmerge.data import Examples
    from guardmerge.finetune import finetune
    from guardmerge.merge.align import FeatureCache
    from guardmerge.merge.statistics import compute_stats
    from guardmerge.models.multihead import MultiHeadModel

    expert = pickle_only(zoo["hate"], tmp_path / "pickled")
    base = pickle_only(zoo["base"], tmp_path / "pickled-base")
    with pytest.raises(CheckpointError, match="pickle"):
        compute_stats(expert, TEXTS, {"gram"}, StatsConfig(), progress=False)
    with pytest.raises(CheckpointError, match="pickle"):
        FeatureCache().get(expert, "hate", TEXTS, 32, 8)
    with pytest.raises(CheckpointError, match="pickle"):
        MultiHeadModel.from_classifier(expert, "hate")
    with pytest.raises(CheckpointError, match="pickle"):
        finetune(base, Examples(list(TEXTS), [0, 1] * 4), ["a", "b"], tmp_path / "ft", progress=False)
    assert not (tmp_path / "ft").exists()
    assert FeatureCache(allow_pickle=True).get(expert, "hate", TEXTS, 32, 8).logits.shape == (len(TEXTS), 2)


# -- 6: dtypes and quantised checkpoints -------------------------------------------------------


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


# -- 8: no read outside the model folder; no raw bytes in errors -------------------------------


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_shard_paths_outside_the_folder_refused(tmp_path: Path, zoo: dict[str, Path], merged: Path, shard: str) -> None:
    import guardmerge

    shutil.copy(zoo["hate"] / "model.safetensors", tmp_path / "outside.safetensors")
    for src in (zoo["hate"], merged):
        folder = copy_expert(src, tmp_path / src.name)
        keys = list(load_file(str(folder / "model.safetensors")))
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, shard)}))
        with pytest.raises(CheckpointError, match="outside the model folder"):
            Checkpoint(folder) if src == zoo["hate"] else guardmerge.load(str(folder))
        shutil.rmtree(folder)


def test_invalid_header_error_never_quotes_file_bytes(tmp_path: Path, merged: Path) -> None:
    import guardmerge

    secret = "SECRET-" + "x" * 5000
    for header in (
        b'{"' + secret.encode() + b'": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]',
        json.dumps({secret: {"dtype": secret, "shape": [1], "data_offsets": [0, 4]}}).encode(),
        b"\xff\xfe" + secret.encode(),
        b"[" * 100_000 + b"]" * 100_000,
    ):
        folder = copy_expert(merged, tmp_path / "m")
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
        for opener in (guardmerge.load, Checkpoint):
            with pytest.raises(CheckpointError) as info:
                opener(str(folder))
            assert "SECRET-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" not in str(
                info.value
            )
            assert len(str(info.value)) < 500
        shutil.rmtree(folder)


# -- 10: load() checks the config against the headers before allocating ------------------------


def test_load_checks_config_against_shapes_before_allocating(tmp_path: Path, merged: Path) -> None:
    import resource

    import guardmerge

    bad = copy_expert(merged, tmp_path / "bad")
    edit_config(bad, vocab_size=8_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"word_embeddings.*stored as \[.*config implies \[8000000"):
        guardmerge.load(str(bad))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200_000  # the 8M-token embedding (512 MB at 16 dims) was never allocated


def test_load_refuses_malformed_heads_metadata(tmp_path: Path, merged: Path) -> None:
    import guardmerge

    cfg = json.loads((merged / "config.json").read_text())
    for heads, match in (
        ([1, 2], "must map each task"),
        ({"hate": "x"}, "expected an object"),
        ({"hate": {**cfg["guardmerge"]["heads"]["hate"], "activation": "no-such-activation"}}, "activation"),
        ({"hate": {**cfg["guardmerge"]["heads"]["hate"], "labels": None}}, "labels"),
        ({"a.b": cfg["guardmerge"]["heads"]["hate"]}, "task name"),
    ):
        bad = copy_expert(merged, tmp_path / "bad")
        edit_config(bad, guardmerge={**cfg["guardmerge"], "heads": heads})
        with pytest.raises(CheckpointError, match=match):
            guardmerge.load(str(bad))
        shutil.rmtree(bad)


# -- 11: long texts ----------------------------------------------------------------------------


def test_stats_caps_max_length_at_the_model_positions(
    tmp_path: Path, zoo: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from typer.testing import CliRunner

    from guardmerge.cli import app

    data = tmp_path / "long.txt"
    data.write_text(" ".join(["hate"] * 300) + "\nshort text\n")  # 300 tokens; the tiny model has 64 positions
    with caplog.at_level("INFO"):
        res = CliRunner().invoke(
            app,
            [
                "stats",
                str(zoo["hate"]),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "s.safetensors"),
                "--max-length",
                "512",
                "-k",
                "gram",
                "-k",
                "fisher",
            ],
        )
    assert res.exit_code == 0, res.output
    assert "capped at 64" in caplog.text


def test_data_files_cap_characters_per_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from guardmerge.data import MAX_TEXT_CHARS, read_examples

    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"text": "a" * (MAX_TEXT_CHARS * 3)}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with caplog.at_level("WARNING"):
        texts = read_examples(path).texts
    assert [len(t) for t in texts] == [MAX_TEXT_CHARS, 1] and "truncated" in caplog.text


# -- 12: clean errors, never a traceback -------------------------------------------------------


def test_deeply_nested_and_binary_inputs_give_clean_errors(tmp_path: Path, zoo: dict[str, Path]) -> None:
    from guardmerge.data import read_examples

    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=r"deep.jsonl, line 1: invalid JSON: nested too deeply"):
        read_examples(deep)
    for suffix in (".jsonl", ".csv", ".txt"):
        binary = tmp_path / f"bin{suffix}"
        binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00" * 50)
        with pytest.raises(DataError, match="not UTF-8 text"):
            read_examples(binary)
    model = copy_expert(zoo["hate"], tmp_path / "binconfig")
    (model / "config.json").write_bytes(b"\xff\xd8\xff\xe0" * 10)
    with pytest.raises(CheckpointError, match="not UTF-8 text"):
        Checkpoint(model)
    (model / "config.json").write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        Checkpoint(model)
    yml = tmp_path / "bin.yaml"
    yml.write_bytes(b"\xff\xfe\x00\x01" * 20)
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(yml)


@pytest.mark.parametrize("text", ["null", "123", "1.5", "true", '["x"]'])
def test_jsonl_text_must_be_a_string(tmp_path: Path, text: str) -> None:
    from guardmerge.data import read_examples

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": ' + text + "}\n")
    with pytest.raises(DataError, match=r"d.jsonl, line 3: field 'text' must be a string"):
        read_examples(path)


def test_path_errors_exit_2_with_one_line(
    tmp_path: Path,
    zoo: dict[str, Path],
    merged: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = merge_cfg(tmp_path, zoo)
    plain = tmp_path / "afile.txt"
    plain.write_text("not a folder")
    long = tmp_path / ("x" * 300)
    for args, needle in (
        (["merge", str(cfg), str(long)], "name too long"),
        (["merge", str(cfg), str(tmp_path / ("d" * 300) / "out")], "too long"),
        (["merge", str(long) + ".yaml", str(tmp_path / "o")], "too long"),
        (["merge", str(cfg), str(plain / "out")], "is a file, not a folder"),
        (["export-onnx", str(merged), str(plain / "onnx")], "is a file, not a folder"),
        (
            ["stats", str(zoo["hate"]), "--data", str(data_file(tmp_path)), "--out", str(plain / "s.safetensors")],
            "is a file, not a folder",
        ),
        (
            ["stats", str(zoo["hate"]), "--data", str(data_file(tmp_path)), "--out", str(tmp_path), "--force"],
            "contains the input",
        ),
        (
            ["stats", str(zoo["hate"]), "--data", str(data_file(tmp_path)), "--out", str(merged), "--force"],
            "is a folder",
        ),
    ):
        code, err = run_cli(monkeypatch, capsys, *args)
        assert_clean_refusal(code, err, needle)


def test_disk_full_becomes_an_error_naming_the_output(
    tmp_path: Path, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from guardmerge.merge import write as engine
    from guardmerge.merge.stages import merge_to_folder

    real = engine.model_card

    def full(*a: object, **k: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine, "model_card", full)
    with pytest.raises(OutputError, match=r"cannot write output '.*out': No space left on device"):
        merge_to_folder(MergeJob.of(load_config(merge_cfg(tmp_path, zoo))), tmp_path / "out", progress=False)
    monkeypatch.setattr(engine, "model_card", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_cli_subprocess_one_line_error(tmp_path: Path, zoo: dict[str, Path]) -> None:
    bad = copy_expert(zoo["hate"], tmp_path / "bad")
    edit_weights(bad, lambda s: s["classifier.weight"].__setitem__((0, 0), float("inf")))
    cfg = merge_cfg(tmp_path, zoo, experts=[{"model": str(bad), "task": "hate"}])
    proc = subprocess.run(
        [sys.executable, "-m", "guardmerge.cli", "merge", str(cfg), str(tmp_path / "o")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: expert 'hate'") and "Traceback" not in proc.stderr


# -- 13: labels vs head, stale temporary folders ------------------------------------------------


@pytest.mark.parametrize("change", [{"id2label": {"0": "a", "1": "b", "2": "c"}}, {"num_labels": 5}])
def test_label_count_must_match_the_head(tmp_path: Path, zoo: dict[str, Path], change: dict) -> None:
    from guardmerge.merge.stages import merge_to_folder

    bad = copy_expert(zoo["hate"], tmp_path / "bad")
    edit_config(bad, **change)
    cfg = load_config(merge_cfg(tmp_path, zoo, experts=[{"model": str(bad), "task": "hate"}]))
    with pytest.raises(CheckpointError, match=r"expert 'hate'.*declares \d labels but its classifier"):
        merge_to_folder(MergeJob.of(cfg), tmp_path / "out", progress=False)


def test_stale_temporary_folders_of_dead_runs_are_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from guardmerge.io import atomic_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / ".out.tmp-dead1"
    alive = tmp_path / ".out.tmp-alive"
    foreign = tmp_path / ".out.tmp-nomarker"
    other = tmp_path / ".other.tmp-dead2"
    for folder, pid in ((stale, dead.pid), (alive, os.getppid()), (foreign, None), (other, dead.pid)):
        folder.mkdir()
        (folder / "model.safetensors").write_text("partial")
        if pid is not None:
            (folder / ".guardmerge-tmp").write_text(f"{pid} {host}\n")
    with caplog.at_level("WARNING"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert not stale.exists() and alive.exists() and foreign.exists() and other.exists()
    assert "interrupted guardmerge run" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a"]  # the marker never reaches the output
