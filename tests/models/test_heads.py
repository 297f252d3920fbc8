"""Heads: the ``guardmerge.heads`` entries (:class:`HeadSpec`, checked field by field), the :class:`Head`
module, and heads built from stored or stock tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from guardmerge.errors import CheckpointError, GuardmergeError
from guardmerge.models.adapters import HeadLayout
from guardmerge.models.heads import (
    HEAD_PREFIX,
    HeadSpec,
    head_from_tensors,
    head_specs,
    make_activation,
    stock_head_tensors,
)
from tests.builders import copy_expert, edit_config


def test_old_head_entries_load_and_new_fields_are_checked(tmp_path: Path) -> None:
    old = {"labels": ["a", "b"], "layers": ["classifier"], "input": "pooled", "activation": "tanh"}
    spec = head_specs({"t": old}, tmp_path)["t"]
    assert spec.problem == "single_label" and not spec.thresholds
    assert spec.to_dict() == old  # a single-label head is written as before
    token = HeadSpec(("O", "B-X", "I-X"), ("classifier",), "tokens", "tanh", problem="token")
    assert HeadSpec.from_dict(token.to_dict()) == token
    for bad, field in [
        ({**old, "problem": "regression"}, "problem"),
        ({**old, "problem": "token"}, "input"),
        ({**old, "input": "tokens"}, "input"),
        ({**old, "thresholds": {"c": 0.5}}, "thresholds"),
        ({**old, "thresholds": {"a": 3}}, "thresholds"),
    ]:
        with pytest.raises(CheckpointError, match=rf"guardmerge.heads.t.{field}"):
            head_specs({"t": bad}, tmp_path)


def test_a_spec_reads_its_kind_from_the_table() -> None:
    token = HeadSpec(("O", "B-X"), ("classifier",), "tokens", "tanh", problem="token")
    assert token.kind.name == "token" and token.token and token.kind.per_token
    plain = HeadSpec(("a", "b"), ("classifier",), "pooled", "tanh")
    assert plain.kind.name == "single_label" and not plain.token
    with pytest.raises(GuardmergeError, match="unknown head kind"):
        _ = HeadSpec(("a",), ("classifier",), "pooled", "tanh", problem="regression").kind


def _tensors(task: str, hidden: int = 4, classes: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    lead = f"{HEAD_PREFIX}{task}."
    return {
        lead + "classifier.dense.weight": torch.randn(hidden, hidden),
        lead + "classifier.dense.bias": torch.randn(hidden),
        lead + "classifier.out_proj.weight": torch.randn(classes, hidden),
        lead + "classifier.out_proj.bias": torch.randn(classes),
    }


def test_a_head_built_from_tensors_runs_its_layers_and_gives_them_back() -> None:
    spec = HeadSpec(("a", "b", "c"), ("classifier.dense", "classifier.out_proj"), "cls", "tanh")
    tensors = _tensors("t")
    head = head_from_tensors("t", spec, tensors)
    x = torch.randn(2, 4)
    lead = f"{HEAD_PREFIX}t."
    hidden = torch.tanh(x @ tensors[lead + "classifier.dense.weight"].T + tensors[lead + "classifier.dense.bias"])
    want = hidden @ tensors[lead + "classifier.out_proj.weight"].T + tensors[lead + "classifier.out_proj.bias"]
    assert torch.allclose(head(x), want, atol=1e-6)
    assert all(torch.equal(head.state("t")[k], v) for k, v in tensors.items())


def test_a_head_is_refused_when_its_tensors_do_not_fit_its_spec() -> None:
    spec = HeadSpec(("a", "b", "c"), ("classifier.dense", "classifier.out_proj"), "cls", "tanh")
    lacking = {k: v for k, v in _tensors("t").items() if not k.endswith("out_proj.bias")}
    with pytest.raises(CheckpointError, match="tensor 'heads.t.classifier.out_proj.bias' is missing"):
        head_from_tensors("t", spec, lacking)
    two_labels = HeadSpec(("a", "b"), spec.layers, "cls", "tanh")
    with pytest.raises(CheckpointError, match="3 outputs but 2 label names"):
        head_from_tensors("t", two_labels, _tensors("t"))
    with pytest.raises(GuardmergeError, match="unknown head activation 'swish2'"):
        make_activation("swish2")


def test_stock_head_tensors_store_zeros_for_the_biases_the_stock_head_lacks() -> None:
    layout = HeadLayout(("head.dense", "classifier"), "gelu", "cls", (), 1e-5, ("head.dense",))
    stored = {
        "head.dense.weight": torch.ones(4, 4),
        "classifier.weight": torch.ones(2, 4),
        "classifier.bias": torch.ones(2),
    }
    out = stock_head_tensors("t", layout, stored.__getitem__)
    assert torch.equal(out["heads.t.head.dense.bias"], torch.zeros(4))
    assert torch.equal(out["heads.t.classifier.bias"], torch.ones(2))


def test_load_refuses_malformed_heads_metadata(tmp_path: Path, merged_folder: Path) -> None:
    import guardmerge

    cfg = json.loads((merged_folder / "config.json").read_text())
    for heads, match in (
        ([1, 2], "must map each task"),
        ({"hate": "x"}, "expected an object"),
        ({"hate": {**cfg["guardmerge"]["heads"]["hate"], "activation": "no-such-activation"}}, "activation"),
        ({"hate": {**cfg["guardmerge"]["heads"]["hate"], "labels": None}}, "labels"),
        ({"a.b": cfg["guardmerge"]["heads"]["hate"]}, "task name"),
    ):
        bad = copy_expert(merged_folder, tmp_path / "bad")
        edit_config(bad, guardmerge={**cfg["guardmerge"], "heads": heads})
        with pytest.raises(CheckpointError, match=match):
            guardmerge.load(str(bad))
        shutil.rmtree(bad)
