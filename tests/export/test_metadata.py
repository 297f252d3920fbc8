"""The metadata of an ONNX export (guardmerge.export.metadata): ``guardmerge_onnx.json`` as
export-onnx writes it passes unchanged; a model file outside the folder, malformed fields and an
unreadable file are each one line naming the file, from :func:`read_metadata` and so from the onnx
backend that opens the folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from guardmerge.errors import GuardmergeError
from guardmerge.export.metadata import META_FILE, ONNX_FILE, is_onnx_folder, read_metadata
from guardmerge.serve import OnnxBackend
from tests.builders import rewrite_onnx_metadata


def _refused(onnx_copy: Path, *needles: str) -> str:
    """``read_metadata`` refuses ``onnx_copy`` with one line naming the file and ``needles``; the onnx
    backend, which reads the metadata first, refuses it with the same line."""
    with pytest.raises(GuardmergeError) as caught:
        read_metadata(onnx_copy)
    message = str(caught.value)
    with pytest.raises(GuardmergeError) as caught:
        OnnxBackend(onnx_copy)
    assert str(caught.value) == message
    assert "\n" not in message and (META_FILE in message or ONNX_FILE in message), message
    for needle in needles:
        assert needle in message, message
    return message


def test_only_an_export_folder_is_one(onnx_dir: Path, merged_dir: Path) -> None:
    assert is_onnx_folder(onnx_dir) and not is_onnx_folder(merged_dir)
    meta = read_metadata(onnx_dir)
    assert meta["model_file"] == ONNX_FILE and (onnx_dir / meta["model_file"]).is_file()
    assert meta["max_length"] >= 1 and meta["inputs"][0] == "input_ids"
    with pytest.raises(GuardmergeError, match="not a folder written by 'guardmerge export-onnx'"):
        read_metadata(merged_dir)


def test_model_file_outside_the_folder_is_refused(onnx_copy: Path, tmp_path: Path) -> None:
    written = json.loads((onnx_copy / META_FILE).read_text())
    meta = read_metadata(onnx_copy)  # the metadata as export-onnx writes it passes, unchanged
    assert meta["heads"] == written["heads"] and meta["tasks"] == written["tasks"] and meta["info"] == written["info"]
    shutil.copy(onnx_copy / ONNX_FILE, tmp_path / "x")  # a real graph outside: the path alone must be refused
    rewrite_onnx_metadata(onnx_copy, lambda m: m.update(model_file="../x"))
    _refused(onnx_copy, "model_file")
    rewrite_onnx_metadata(onnx_copy, lambda m: m.update(model_file=str(tmp_path / "x")))
    _refused(onnx_copy, "model_file")
    rewrite_onnx_metadata(onnx_copy, lambda m: m.update(model_file="link.onnx"))
    (onnx_copy / "link.onnx").symlink_to(tmp_path / "x")
    _refused(onnx_copy, "model_file", "outside")


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
    onnx_copy: Path, change: Callable[[dict[str, Any]], None], needles: list[str]
) -> None:
    rewrite_onnx_metadata(onnx_copy, change)
    _refused(onnx_copy, META_FILE, *needles)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\xff\xfe\x00\x01binary", "UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b"[" * 100_000, "JSON"),
    ],
)
def test_unreadable_metadata_is_a_one_line_error(onnx_copy: Path, content: bytes, needle: str) -> None:
    (onnx_copy / META_FILE).write_bytes(content)
    _refused(onnx_copy, needle)
