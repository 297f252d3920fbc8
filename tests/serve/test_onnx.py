"""ONNX export: one graph, every head, dynamic axes, parity with PyTorch; the onnx backend over HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
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
from guardmerge.serve import OnnxBackend, TorchBackend, load_backend  # noqa: E402
from tests.builders import TEXTS  # noqa: E402
from tests.serve.conftest import TASKS  # noqa: E402

LONG = " ".join(TEXTS)  # longer than the texts the graph was traced with


def test_folder_is_self_contained_with_one_graph(onnx_dir: Path, merged: MultiHeadModel) -> None:
    import onnx

    names = {p.name for p in onnx_dir.iterdir()}
    assert {ONNX_FILE, META_FILE, "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".") for n in names)
    meta = json.loads((onnx_dir / META_FILE).read_text())
    assert meta["tasks"] == list(TASKS) and meta["precision"] == "fp32"
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["heads"] == {
        t: {
            "labels": merged.labels(t),
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
        assert dims[0].dim_param == "batch" and dims[1].dim_value == len(merged.labels(task))


@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:1], [LONG, "sure"], ["sure"] * 5])
def test_onnx_logits_equal_torch_within_1e_4(onnx_dir: Path, merged: MultiHeadModel, texts: list[str]) -> None:
    session = ort.InferenceSession(str(onnx_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    enc = merged.encode(texts)
    outs = session.run(None, {k: v.numpy() for k, v in enc.items()})
    ref = merged.logits(texts)
    for out, task in zip(outs, TASKS):
        assert out.shape == tuple(ref[task].shape)
        np.testing.assert_allclose(out, ref[task].numpy(), atol=1e-4, rtol=0)


def test_onnx_backend_matches_torch_backend(onnx_dir: Path, merged: MultiHeadModel) -> None:
    onnx_backend, torch_backend = OnnxBackend(onnx_dir, threads=1), TorchBackend(merged)
    assert onnx_backend.tasks == torch_backend.tasks
    assert all(onnx_backend.labels(t) == torch_backend.labels(t) for t in TASKS)
    a = onnx_backend.logits([*TEXTS, LONG])
    b = torch_backend.logits([*TEXTS, LONG])
    for t in TASKS:
        np.testing.assert_allclose(a[t], b[t], atol=1e-4, rtol=0)
    assert list(onnx_backend.logits(["sure"], ["sentiment"])) == ["sentiment"]
    with pytest.raises(GuardmergeError, match="unknown task 'spam'"):
        onnx_backend.logits(["sure"], ["spam"])


def test_int8_export_runs_close_to_fp32(merged: MultiHeadModel, onnx_dir: Path, tmp_path: Path) -> None:
    out = export_onnx(merged, tmp_path / "int8", quantize="int8")
    assert read_metadata(out)["precision"] == "int8"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".onnx") == [ONNX_FILE]
    q = OnnxBackend(out).logits(TEXTS)
    ref = merged.logits(TEXTS)
    for t in TASKS:
        assert q[t].shape == tuple(ref[t].shape) and np.isfinite(q[t]).all()
        assert np.abs(q[t] - ref[t].numpy()).max() < 0.5  # tiny random model: a loose bound


def test_export_is_atomic_and_refuses_existing(
    merged: MultiHeadModel, onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(OutputExistsError):
        export_onnx(merged, onnx_dir)
    with pytest.raises(GuardmergeError, match="unknown quantisation 'int4'"):
        export_onnx(merged, tmp_path / "q", quantize="int4")

    attention = merged.encoder.config._attn_implementation

    def broken(*args: object, **kwargs: object) -> None:
        assert merged.encoder.config._attn_implementation == "eager"  # traced on the eager path
        raise RuntimeError("exporter failed")

    monkeypatch.setattr("torch.onnx.export", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(merged, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind
    assert merged.encoder.config._attn_implementation == attention  # restored


def test_serve_onnx_backend_over_http(onnx_dir: Path, merged: MultiHeadModel, serve: Callable) -> None:
    for extra in ("fastapi", "uvicorn", "prometheus_client"):
        pytest.importorskip(extra)
    httpx = pytest.importorskip("httpx")
    expected = merged.predict(TEXTS)
    backend = load_backend(onnx_dir, "onnx", threads=1)
    with serve(backend) as url:
        res = httpx.post(f"{url}/v1/classify", json={"texts": TEXTS}, timeout=30)
        info = httpx.get(f"{url}/v1/model").json()
    assert res.status_code == 200, res.text
    assert info["backend"] == "onnx" and info["method"] == "task_arithmetic"
    for i, row in enumerate(res.json()["results"]):
        for t in TASKS:
            assert row["heads"][t]["label"] == expected[t][i]["label"]
            assert row["heads"][t]["score"] == pytest.approx(expected[t][i]["score"], abs=1e-4)


def test_onnx_backend_reports_non_finite_weights(onnx_dir: Path, tmp_path: Path) -> None:
    import shutil

    import onnx
    from onnx import numpy_helper

    assert OnnxBackend(onnx_dir).non_finite_weights() == []
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    proto = onnx.load(str(broken / ONNX_FILE))
    init = next(i for i in proto.graph.initializer if numpy_helper.to_array(i).dtype == np.float32)
    values = numpy_helper.to_array(init).copy()
    values.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(proto, str(broken / ONNX_FILE))
    assert OnnxBackend(broken).non_finite_weights() == [init.name]


def test_load_backend_choices(merged_dir: Path, onnx_dir: Path, tmp_path: Path) -> None:
    on_the_fly = load_backend(merged_dir, "onnx")
    assert isinstance(on_the_fly, OnnxBackend)
    tmp = on_the_fly.folder.parent
    assert tmp.is_dir()
    on_the_fly.close()
    assert not tmp.exists()  # the temporary export is removed
    assert isinstance(load_backend(merged_dir, "torch"), TorchBackend)
    with pytest.raises(GuardmergeError, match="ONNX export: serve it with --backend onnx"):
        load_backend(onnx_dir, "torch")
    with pytest.raises(GuardmergeError, match="unknown backend 'tf'"):
        load_backend(merged_dir, "tf")
    with pytest.raises(GuardmergeError, match="does not exist"):
        load_backend(tmp_path / "nope", "torch")
    with pytest.raises(GuardmergeError, match="not a folder written by 'guardmerge export-onnx'"):
        OnnxBackend(merged_dir)


def test_cli_export_onnx(merged_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli_app, ["export-onnx", str(merged_dir), str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "fp32" in res.output and (tmp_path / "o" / ONNX_FILE).is_file()
    again = runner.invoke(cli_app, ["export-onnx", str(merged_dir), str(tmp_path / "o")])
    assert isinstance(again.exception, OutputExistsError)
    bad = runner.invoke(cli_app, ["export-onnx", str(merged_dir), str(tmp_path / "q"), "--quantize", "int4"])
    assert isinstance(bad.exception, GuardmergeError) and "int4" in str(bad.exception)


def test_onnx_backend_reads_tokenizer_json_without_torch(onnx_dir: Path) -> None:
    """An ONNX runtime process never imports torch or transformers (tokenizer.json is read with
    the tokenizers library), and gets the logits the folder's own transformers tokenizer gives."""
    import subprocess
    import sys

    code = (
        "import sys, json\n"
        "from guardmerge.serve.backends import load_backend\n"
        f"b = load_backend({str(onnx_dir)!r}, 'onnx', threads=1)\n"
        f"out = b.logits({TEXTS!r})\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules, "
        "'tokenizer': type(b.tokenizer).__name__, 'logits': {k: v.tolist() for k, v in out.items()}}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["tokenizer"] == "JsonTokenizer" and not got["torch"] and not got["transformers"]
    want = OnnxBackend(onnx_dir)
    from transformers import AutoTokenizer

    want.tokenizer = AutoTokenizer.from_pretrained(str(onnx_dir))
    for task, logits in want.logits(TEXTS).items():
        np.testing.assert_allclose(np.asarray(got["logits"][task]), logits, atol=1e-6, rtol=0)
