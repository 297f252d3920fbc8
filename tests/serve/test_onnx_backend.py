"""The onnx backend (guardmerge.serve.backends.OnnxBackend) over an export folder: parity with the
torch backend, serving over HTTP, load_backend's choices, a tokenizer read without torch. The folder
is not trusted: non-finite weights never answer, and the graph is checked against its metadata (the
metadata's own checks: tests/export/test_metadata.py)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from guardmerge.errors import GuardmergeError, NonFiniteWeightsError  # noqa: E402
from guardmerge.export.metadata import META_FILE, ONNX_FILE  # noqa: E402
from guardmerge.export.onnx import export_onnx  # noqa: E402
from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import OnnxBackend, TorchBackend, load_backend  # noqa: E402
from tests.builders import TEXTS, WORDS, rewrite_onnx_metadata  # noqa: E402
from tests.serve.conftest import TASKS  # noqa: E402

LONG = " ".join(TEXTS)  # longer than the texts the graph was traced with
KILL_ID = 5 + WORDS.index("kill")  # [PAD] [UNK] [CLS] [SEP] [MASK], then the words
SAFE_TEXTS = [t for t in TEXTS if "kill" not in t]


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
    # every run gives the arena's memory back (a server's RSS would otherwise keep its largest batch)
    assert onnx_backend.run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"


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

    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["tokenizer"] == "JsonTokenizer" and not got["torch"] and not got["transformers"]
    want = OnnxBackend(onnx_dir)
    from transformers import AutoTokenizer

    want.tokenizer = AutoTokenizer.from_pretrained(str(onnx_dir))
    for task, logits in want.logits(TEXTS).items():
        np.testing.assert_allclose(np.asarray(got["logits"][task]), logits, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def int8_dir(merged: MultiHeadModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(merged, tmp_path_factory.mktemp("onnx") / "int8", quantize="int8")


def _edit_initializer(src: Path, dst: Path, name: str, edit: Callable[[np.ndarray], None]) -> Path:
    """A copy of the export ``src`` at ``dst`` whose initializer ``name`` was changed in place by ``edit``."""
    shutil.copytree(src, dst)
    proto = onnx.load(str(dst / ONNX_FILE))
    init = next(i for i in proto.graph.initializer if i.name == name)
    values = numpy_helper.to_array(init).copy()
    edit(values)
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(proto, str(dst / ONNX_FILE))
    return dst


def _nan_row(values: np.ndarray) -> None:
    values[KILL_ID] = np.nan


def _nan_all(values: np.ndarray) -> None:
    values[...] = np.nan


# -- 1. non-finite weights: the backend never answers, the server gives no 200 --------------------------------
@pytest.mark.parametrize(
    ("initializer", "edit"),
    [
        ("model.encoder.embeddings.word_embeddings.weight", _nan_row),  # one row: texts without 'kill' avoid it
        ("model.heads.hate.layers.0.weight", _nan_all),  # one head: the others would answer
    ],
)
def test_onnx_non_finite_weights_never_answer(
    onnx_dir: Path, tmp_path: Path, serve: Callable, initializer: str, edit: Callable[[np.ndarray], None]
) -> None:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    broken = _edit_initializer(onnx_dir, tmp_path / "broken", initializer, edit)
    backend = load_backend(broken, "onnx", threads=1)
    assert backend.bad_weights == [initializer]  # type: ignore[attr-defined]
    with pytest.raises(NonFiniteWeightsError, match=initializer.replace(".", r"\.")):
        backend.logits(SAFE_TEXTS, ["injection"])
    with serve(backend, max_wait_ms=0) as url:
        health = httpx.get(f"{url}/healthz")
        responses = [
            httpx.post(f"{url}/v1/classify", json={"texts": [text], "tasks": tasks}, timeout=30)
            for text in SAFE_TEXTS
            for tasks in ([t] for t in TASKS)
        ]
        together = httpx.post(f"{url}/v1/classify", json={"texts": SAFE_TEXTS}, timeout=30)
    assert health.status_code == 503 and health.json()["status"] == "non_finite_weights"
    for res in [*responses, together]:
        assert res.status_code == 503, res.text
        assert res.json()["error"]["code"] == "non_finite_weights" and "results" not in res.json()


def test_int8_graph_checks_its_float_scales_not_its_integer_weights(int8_dir: Path, tmp_path: Path) -> None:
    assert OnnxBackend(int8_dir).bad_weights == []  # integer initializers are not mistaken for bad ones
    scale = "model.heads.injection.layers.0.weight_scale"
    names = {i.name for i in onnx.load(str(int8_dir / ONNX_FILE)).graph.initializer}
    if scale not in names:  # the quantiser's naming: a per-channel scale of the head's weight
        scale = next(n for n in sorted(names) if "heads.injection" in n and n.endswith("_scale"))
    broken = _edit_initializer(int8_dir, tmp_path / "broken", scale, _nan_all)
    backend = OnnxBackend(broken)
    assert backend.bad_weights == [scale]
    with pytest.raises(NonFiniteWeightsError):
        backend.logits(["sure"], ["hate"])


def test_onnx_backend_without_the_onnx_package_trusts_only_unchanged_export_digests(
    onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    undigested = tmp_path / "undigested"
    shutil.copytree(onnx_dir, undigested)
    meta = json.loads((undigested / META_FILE).read_text())
    assert set(meta.pop("weights_sha256")) == {ONNX_FILE}  # the export recorded the graph it checked
    (undigested / META_FILE).write_text(json.dumps(meta))
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    backend = OnnxBackend(onnx_dir)  # unchanged files: their digests stand for the export's check
    assert backend.bad_weights == [] and set(backend.logits(["sure"])) == set(TASKS)
    with pytest.raises(GuardmergeError, match=r"onnx package.*pip install 'guardmerge\[onnx\]'") as caught:
        OnnxBackend(undigested)
    assert "\n" not in str(caught.value)


def test_a_graph_changed_after_export_gets_the_full_weight_check(
    onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import onnx

    from guardmerge.export import weights

    checked: list[Path] = []
    real = weights.non_finite_initializers
    monkeypatch.setattr(weights, "non_finite_initializers", lambda p: (checked.append(p), real(p))[1])
    assert OnnxBackend(onnx_dir).bad_weights == [] and checked == []  # digests match: no graph parse
    changed = tmp_path / "changed"
    shutil.copytree(onnx_dir, changed)
    proto = onnx.load(str(changed / ONNX_FILE))
    proto.doc_string = "edited after export"  # any change to the bytes, even one that leaves the weights
    onnx.save(proto, str(changed / ONNX_FILE))
    assert OnnxBackend(changed).bad_weights == []
    assert checked == [changed / ONNX_FILE]


def test_export_refuses_a_graph_whose_weights_are_not_finite(
    merged_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import guardmerge
    from guardmerge.export import onnx as exporter

    monkeypatch.setattr(exporter, "non_finite_initializers", lambda p: ["encoder.layer.0.weight"])
    with pytest.raises(GuardmergeError, match="NaN or infinity.*encoder.layer.0.weight.*nothing was written"):
        export_onnx(guardmerge.load(str(merged_dir)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- 5. untrusted metadata and graph -------------------------------------------------------------------------
def _refused(onnx_copy: Path, *needles: str) -> str:
    with pytest.raises(GuardmergeError) as caught:
        OnnxBackend(onnx_copy)
    message = str(caught.value)
    assert "\n" not in message and (META_FILE in message or ONNX_FILE in message), message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("content", [b"this is not an onnx graph at all", b"\x08\x07" + bytes(range(256)) * 4, b""])
def test_a_file_that_is_not_an_onnx_graph_is_a_one_line_error(onnx_copy: Path, content: bytes) -> None:
    (onnx_copy / ONNX_FILE).write_bytes(content)
    _refused(onnx_copy, ONNX_FILE)
    with pytest.raises(GuardmergeError):
        load_backend(onnx_copy, "onnx")


def test_a_graph_without_a_head_output_is_refused(onnx_copy: Path) -> None:
    rewrite_onnx_metadata(onnx_copy, lambda m: m["heads"]["hate"].update(output="logits_missing"))
    _refused(onnx_copy, "logits_missing")
