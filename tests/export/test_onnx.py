"""ONNX export (guardmerge.export.onnx): one self-contained folder, one graph with every head,
dynamic axes, parity with PyTorch, int8 quantisation, atomic output, the export-onnx command.
Serving the export: tests/serve/test_onnx_backend.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from guardmerge.cli import app as cli_app  # noqa: E402
from guardmerge.errors import GuardmergeError, OutputExistsError  # noqa: E402
from guardmerge.export.metadata import META_FILE, ONNX_FILE, read_metadata  # noqa: E402
from guardmerge.export.onnx import export_onnx  # noqa: E402
from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import OnnxBackend  # noqa: E402
from tests.builders import MERGED_TASKS as TASKS  # noqa: E402
from tests.builders import TEXTS  # noqa: E402

LONG = " ".join(TEXTS)  # longer than the texts the graph was traced with


def test_folder_is_self_contained_with_one_graph(onnx_dir: Path, merged_model: MultiHeadModel) -> None:
    import onnx

    names = {p.name for p in onnx_dir.iterdir()}
    assert {ONNX_FILE, META_FILE, "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".") for n in names)
    meta = json.loads((onnx_dir / META_FILE).read_text())
    assert meta["tasks"] == list(TASKS) and meta["precision"] == "fp32"
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["heads"] == {
        t: {
            "labels": merged_model.labels(t),
            "output": f"logits_{t}",
            "problem": "single_label",
            "activation": "softmax",
            **({"benign": ["neu"]} if t == "sentiment" else {}),  # stored at merge; the others are guessed
        }
        for t in TASKS
    }
    assert meta["info"]["method"] == "task_arithmetic"
    graph = onnx.load(str(onnx_dir / ONNX_FILE)).graph
    assert [i.name for i in graph.input] == meta["inputs"]
    assert [o.name for o in graph.output] == [f"logits_{t}" for t in TASKS]
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]
    for value, task in zip(graph.output, TASKS):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and dims[1].dim_value == len(merged_model.labels(task))


@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:1], [LONG, "sure"], ["sure"] * 5])
def test_onnx_logits_equal_torch_within_1e_4(onnx_dir: Path, merged_model: MultiHeadModel, texts: list[str]) -> None:
    session = ort.InferenceSession(str(onnx_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    enc = merged_model.encode(texts)
    outs = session.run(None, {k: v.numpy() for k, v in enc.items()})
    ref = merged_model.logits(texts)
    for out, task in zip(outs, TASKS):
        assert out.shape == tuple(ref[task].shape)
        np.testing.assert_allclose(out, ref[task].numpy(), atol=1e-4, rtol=0)


def test_int8_export_runs_close_to_fp32(merged_model: MultiHeadModel, onnx_dir: Path, tmp_path: Path) -> None:
    out = export_onnx(merged_model, tmp_path / "int8", quantize="int8")
    assert read_metadata(out)["precision"] == "int8"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".onnx") == [ONNX_FILE]
    q = OnnxBackend(out).logits(TEXTS)
    ref = merged_model.logits(TEXTS)
    for t in TASKS:
        assert q[t].shape == tuple(ref[t].shape) and np.isfinite(q[t]).all()
        assert np.abs(q[t] - ref[t].numpy()).max() < 0.5  # tiny random model: a loose bound


def test_export_is_atomic_and_refuses_existing(
    merged_model: MultiHeadModel, onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(OutputExistsError):
        export_onnx(merged_model, onnx_dir)
    with pytest.raises(GuardmergeError, match="unknown quantisation 'int4'"):
        export_onnx(merged_model, tmp_path / "q", quantize="int4")

    attention = merged_model.encoder.config._attn_implementation

    def broken(*args: object, **kwargs: object) -> None:
        assert merged_model.encoder.config._attn_implementation == "eager"  # traced on the eager path
        raise RuntimeError("exporter failed")

    monkeypatch.setattr("torch.onnx.export", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(merged_model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind
    assert merged_model.encoder.config._attn_implementation == attention  # restored


def test_cli_export_onnx(merged_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli_app, ["export-onnx", str(merged_dir), str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "fp32" in res.output and (tmp_path / "o" / ONNX_FILE).is_file()
    again = runner.invoke(cli_app, ["export-onnx", str(merged_dir), str(tmp_path / "o")])
    assert isinstance(again.exception, OutputExistsError)
    bad = runner.invoke(cli_app, ["export-onnx", str(merged_dir), str(tmp_path / "q"), "--quantize", "int4"])
    assert isinstance(bad.exception, GuardmergeError) and "int4" in str(bad.exception)
