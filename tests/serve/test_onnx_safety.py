"""An ONNX export folder is not trusted: non-finite weights never answer, metadata and graph are checked."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from guardmerge.errors import GuardmergeError, NonFiniteWeightsError  # noqa: E402
from guardmerge.export.metadata import META_FILE, ONNX_FILE, read_metadata  # noqa: E402
from guardmerge.export.onnx import export_onnx  # noqa: E402
from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import OnnxBackend, load_backend  # noqa: E402
from tests.builders import TEXTS, WORDS  # noqa: E402
from tests.serve.conftest import TASKS  # noqa: E402

KILL_ID = 5 + WORDS.index("kill")  # [PAD] [UNK] [CLS] [SEP] [MASK], then the words
SAFE_TEXTS = [t for t in TEXTS if "kill" not in t]


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


def test_onnx_backend_refuses_to_open_without_the_onnx_package(onnx_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(GuardmergeError, match=r"onnx package.*pip install 'guardmerge\[onnx\]'") as caught:
        OnnxBackend(onnx_dir)
    assert "\n" not in str(caught.value)


# -- 5. untrusted metadata and graph -------------------------------------------------------------------------
@pytest.fixture
def folder(onnx_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(onnx_dir, out)
    return out


def _rewrite(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    change(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def _refused(folder: Path, *needles: str) -> str:
    with pytest.raises(GuardmergeError) as caught:
        OnnxBackend(folder)
    message = str(caught.value)
    assert "\n" not in message and (META_FILE in message or ONNX_FILE in message), message
    for needle in needles:
        assert needle in message, message
    return message


def test_model_file_outside_the_folder_is_refused(folder: Path, tmp_path: Path) -> None:
    written = json.loads((folder / META_FILE).read_text())
    meta = read_metadata(folder)  # the metadata as export-onnx writes it passes, unchanged
    assert meta["heads"] == written["heads"] and meta["tasks"] == written["tasks"] and meta["info"] == written["info"]
    shutil.copy(folder / ONNX_FILE, tmp_path / "x")  # a real graph outside: the path alone must be refused
    _rewrite(folder, lambda m: m.update(model_file="../x"))
    _refused(folder, "model_file")
    _rewrite(folder, lambda m: m.update(model_file=str(tmp_path / "x")))
    _refused(folder, "model_file")
    _rewrite(folder, lambda m: m.update(model_file="link.onnx"))
    (folder / "link.onnx").symlink_to(tmp_path / "x")
    _refused(folder, "model_file", "outside")


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (lambda m: m.update(model_file=5), ["model_file"]),
        (lambda m: m.update(model_file=""), ["model_file"]),
        (lambda m: m.update(inputs="input_ids"), ["inputs"]),
        (lambda m: m.update(inputs=["input_ids", "pixel_values"]), ["inputs"]),
        (lambda m: m.update(tasks=[1, 2]), ["tasks"]),
        (lambda m: m.update(tasks=["hate"]), ["differ"]),
        (lambda m: m.update(max_length="512"), ["max_length"]),
        (lambda m: m["heads"]["hate"].pop("labels"), ["heads.hate.labels"]),
        (lambda m: m["heads"]["hate"].update(labels=[]), ["heads.hate.labels"]),
        (lambda m: m["heads"]["hate"].update(labels=[0, 1]), ["heads.hate.labels"]),
        (lambda m: m["heads"]["hate"].update(labels=["a", ""]), ["heads.hate"]),
        (lambda m: m["heads"]["hate"].pop("output"), ["heads.hate.output"]),
        (lambda m: m["heads"]["hate"].update(output=7), ["heads.hate.output"]),
        (lambda m: m["heads"]["hate"].update(problem="regression"), ["heads.hate.problem"]),
        (lambda m: m["heads"]["hate"].update(thresholds={"hate": 1.5}), ["heads.hate", "[0, 1]"]),
        (lambda m: m["heads"]["hate"].update(thresholds={"hate": "high"}), ["heads.hate.thresholds"]),
        (lambda m: m["heads"]["hate"].update(thresholds={"nope": 0.5}), ["heads.hate", "nope"]),
        (lambda m: m["heads"]["hate"].update(benign="not-hate"), ["heads.hate.benign"]),
        (lambda m: m["heads"]["hate"].update(benign=["nope"]), ["heads.hate", "nope"]),
        (lambda m: m["heads"]["hate"].update(activation="sigmoid"), ["heads.hate", "activation"]),
        (lambda m: m.update(heads=[]), ["heads"]),
        (lambda m: m["heads"]["injection"].update(output="logits_hate"), ["same output"]),
    ],
)
def test_malformed_metadata_is_a_one_line_error(
    folder: Path, change: Callable[[dict[str, Any]], None], needles: list[str]
) -> None:
    _rewrite(folder, change)
    _refused(folder, META_FILE, *needles)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\xff\xfe\x00\x01binary", "UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b"[" * 100_000, "JSON"),
    ],
)
def test_unreadable_metadata_is_a_one_line_error(folder: Path, content: bytes, needle: str) -> None:
    (folder / META_FILE).write_bytes(content)
    _refused(folder, needle)


@pytest.mark.parametrize("content", [b"this is not an onnx graph at all", b"\x08\x07" + bytes(range(256)) * 4, b""])
def test_a_file_that_is_not_an_onnx_graph_is_a_one_line_error(folder: Path, content: bytes) -> None:
    (folder / ONNX_FILE).write_bytes(content)
    _refused(folder, ONNX_FILE)
    with pytest.raises(GuardmergeError):
        load_backend(folder, "onnx")


def test_a_graph_without_a_head_output_is_refused(folder: Path) -> None:
    _rewrite(folder, lambda m: m["heads"]["hate"].update(output="logits_missing"))
    _refused(folder, "logits_missing")
