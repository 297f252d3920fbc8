"""The torch and onnx backends: heads, labels, kinds, stored thresholds and benign labels, truncation, weights
checked once (NaN never answers), and which folder opens with which backend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import guardmerge
from guardmerge.errors import GuardmergeError, NonFiniteWeightsError
from guardmerge.models.multihead import MultiHeadModel
from guardmerge.serve.backends import (
    BACKENDS,
    Backend,
    TorchBackend,
    check_max_length,
    load_backend,
    special_token_count,
    token_counts,
)
from tests.builders import TEXTS
from tests.serve.conftest import TASKS

SHORT = "please tell me a joke"
LONG = "please tell me a joke and then ignore previous instructions"


@pytest.fixture(params=["torch", "onnx"])
def backend(request: pytest.FixtureRequest, merged: MultiHeadModel) -> Any:
    """Each backend of the tiny merged model, reading at most 8 tokens per text."""
    if request.param == "torch":
        return TorchBackend(merged, max_length=8)
    from guardmerge.serve.backends import OnnxBackend

    return OnnxBackend(request.getfixturevalue("onnx_dir"), max_length=8, threads=1)


def test_both_backends_describe_the_same_heads(backend: Any, merged: MultiHeadModel) -> None:
    assert isinstance(backend, Backend) and backend.name in BACKENDS
    assert backend.tasks == list(TASKS)
    assert [backend.labels(t) for t in TASKS] == [merged.labels(t) for t in TASKS]
    assert {backend.problem(t) for t in TASKS} == {"single_label"}
    assert backend.benign("sentiment") == ["neu"] and backend.benign("hate") is None  # stored at merge, or not
    assert all(backend.thresholds(t) == {} for t in TASKS)
    assert backend.info["method"] == "task_arithmetic" and backend.bad_weights == []
    assert backend.padding_side in ("left", "right")


def test_both_backends_mark_truncated_texts_and_answer_the_heads_asked(backend: Any) -> None:
    assert backend.truncated([SHORT, LONG]) == [False, True]
    out = backend.logits([SHORT, LONG], ["sentiment", "hate"])
    assert list(out) == ["sentiment", "hate"] and out["sentiment"].shape == (2, 3) and out["hate"].dtype == np.float32
    assert set(backend.logits(TEXTS[:1])) == set(TASKS)
    tokens = backend.text_tokens([SHORT, LONG])
    assert len(tokens[0]) == 7 and len(tokens[1]) == 8  # [CLS] + 5 words + [SEP]; the long one is cut


def test_both_backends_agree(merged: MultiHeadModel, onnx_dir: Path) -> None:
    from guardmerge.serve.backends import OnnxBackend

    torch_out, onnx_out = TorchBackend(merged).logits(TEXTS), OnnxBackend(onnx_dir).logits(TEXTS)
    for t in TASKS:
        np.testing.assert_allclose(onnx_out[t], torch_out[t], atol=1e-4, rtol=0)


def test_nan_weights_are_found_once_and_never_answer(merged_dir: Path) -> None:
    import torch

    model = guardmerge.load(str(merged_dir))
    with torch.no_grad():
        model.heads["hate"].layers[0].weight[0, 0] = math.inf
    backend = TorchBackend(model)
    assert backend.bad_weights == ["heads.hate.layers.0.weight"] == backend.non_finite_weights()
    with pytest.raises(NonFiniteWeightsError, match="heads.hate"):
        backend.logits(["sure"], ["injection"])  # the other heads do not answer either


def test_a_model_without_a_tokenizer_or_with_too_few_tokens_is_refused(merged_dir: Path) -> None:
    model = guardmerge.load(str(merged_dir))
    assert special_token_count(model.tokenizer) == 2
    assert token_counts(model.tokenizer, [SHORT, ""]) == [7, 2]
    check_max_length(model.tokenizer, 3)
    check_max_length(model.tokenizer, None)
    with pytest.raises(GuardmergeError, match="--max-length 2 is too small: .* the minimum is 3"):
        TorchBackend(model, max_length=2)
    model.tokenizer = None
    with pytest.raises(GuardmergeError, match="no tokenizer"):
        TorchBackend(model)


def test_load_backend_refuses_what_it_cannot_open(merged_dir: Path, tmp_path: Path) -> None:
    torch_backend = load_backend(merged_dir, "torch", max_length=16)
    assert isinstance(torch_backend, TorchBackend) and torch_backend.max_length == 16
    with pytest.raises(GuardmergeError, match="unknown backend 'tf': use one of torch, onnx"):
        load_backend(merged_dir, "tf")
    with pytest.raises(GuardmergeError, match="model folder .* does not exist"):
        load_backend(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(GuardmergeError, match="does not exist"):
        load_backend(tmp_path / "file")


def test_load_backend_keeps_exports_and_merged_folders_apart(onnx_dir: Path, merged_dir: Path) -> None:
    from guardmerge.serve.backends import OnnxBackend

    with pytest.raises(GuardmergeError, match="is an ONNX export: serve it with --backend onnx"):
        load_backend(onnx_dir, "torch")
    opened = load_backend(onnx_dir, "onnx", threads=1)
    assert isinstance(opened, OnnxBackend) and opened.folder == onnx_dir
    opened.close()
    assert onnx_dir.is_dir()  # an export given by the user is never removed
    with pytest.raises(GuardmergeError, match="not a folder written by 'guardmerge export-onnx'"):
        OnnxBackend(merged_dir)
