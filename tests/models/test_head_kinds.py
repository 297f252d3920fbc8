"""The head-kind table: each kind's entry (activation, answers, flag rule, ONNX activation, alignment
target, stock problem type, evaluation metric) behaves as the kind should."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from guardmerge.errors import GuardmergeError
from guardmerge.evaluate import SCORERS
from guardmerge.models.head_kinds import (
    DEFAULT_KIND,
    HEAD_KINDS,
    KIND_NAMES,
    MULTI_LABEL_PROBLEM_TYPE,
    head_kind,
    kinds_where,
    stock_kind,
)
from guardmerge.models.outputs import Answering, TextTokens

LN3 = math.log(3.0)
SINGLE, MULTI, TOKEN = (HEAD_KINDS[k] for k in ("single_label", "multi_label", "token"))


def test_the_table_has_one_entry_per_kind_name_and_the_default_first() -> None:
    assert tuple(HEAD_KINDS) == KIND_NAMES == ("single_label", "multi_label", "token")
    assert all(kind.name == name for name, kind in HEAD_KINDS.items())
    assert next(iter(HEAD_KINDS)) == DEFAULT_KIND
    assert head_kind("multi_label") is MULTI
    with pytest.raises(GuardmergeError, match="unknown head kind 'regression'; expected one of single_label"):
        head_kind("regression")


def test_activation_of_each_kind_on_known_logits() -> None:
    logits = np.array([[0.0, LN3]])
    np.testing.assert_allclose(SINGLE.activation(logits), [[0.25, 0.75]])  # a softmax over the labels
    np.testing.assert_allclose(MULTI.activation(logits), [[0.5, 0.75]])  # a sigmoid per label
    per_token = TOKEN.activation(np.array([[[0.0, LN3], [LN3, 0.0]]]))  # [B, T, C]: a softmax per token
    np.testing.assert_allclose(per_token, [[[0.25, 0.75], [0.75, 0.25]]])
    assert [k.onnx_activation for k in HEAD_KINDS.values()] == ["softmax", "sigmoid", "token_softmax"]


def test_predict_answers_of_each_kind() -> None:
    logits = torch.tensor([[0.0, LN3], [LN3, 0.0]])
    single = SINGLE.predict(logits, Answering(["ok", "bad"]))
    assert [a["label"] for a in single] == ["bad", "ok"]
    assert single[0]["score"] == pytest.approx(0.75)
    multi = MULTI.predict(logits, Answering(["ok", "bad"], thresholds=[0.6, 0.6]))
    assert [a["labels"] for a in multi] == [["bad"], ["ok"]]
    assert multi[0]["probabilities"] == pytest.approx({"ok": 0.5, "bad": 0.75})
    text = "Ann went"
    tokens = TextTokens(offsets=((0, 0), (0, 3), (4, 8), (0, 0)), special=(True, False, False, True),
                        subword=(False, False, False, False))  # fmt: skip
    rows = torch.tensor([[[0.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 0.0]]])  # [CLS] Ann=B-PER went=O [SEP]
    spans = TOKEN.predict(rows, Answering(["O", "B-PER"], texts=[text], tokens=[tokens]))
    assert spans == [
        [{"label": "PER", "start": 0, "end": 3, "text": "Ann", "score": pytest.approx(1 / (1 + math.exp(-5)))}]
    ]


def test_served_answers_and_flag_rules_of_each_kind() -> None:
    probs = np.array([0.2, 0.8])
    assert SINGLE.answer(probs, ["ok", "bad"], [0.5, 0.5]) == {
        "label": "bad",
        "score": pytest.approx(0.8),
        "probabilities": {"ok": pytest.approx(0.2), "bad": pytest.approx(0.8)},
    }
    assert MULTI.answer(probs, ["ok", "bad"], [0.1, None])["labels"] == ["ok"]  # None: that label never counts
    span = {"label": "PER", "start": 0, "end": 3, "text": "Ann", "score": 0.9}
    assert TOKEN.answer([span], ["O", "B-PER"], ()) == {"entities": [span]}
    assert [k.name for k in kinds_where(flags="labels")] == ["single_label", "multi_label"]
    assert [k.name for k in kinds_where(flags="entities")] == ["token"]
    assert [k.name for k in kinds_where(per_token=True)] == ["token"]
    assert [k.name for k in kinds_where(exclusive=True)] == ["single_label"]  # benign labels must be known
    assert [k.name for k in kinds_where(thresholded=True)] == ["multi_label"]


def test_alignment_target_of_each_kind() -> None:
    merged = torch.tensor([[2.0, 1.0], [-1.0, -2.0]])
    expert = torch.tensor([[3.0, -1.0], [1.0, 0.5]])
    # the argmax agrees on both rows; the decisions at 0.5 (logit 0) differ on three of four labels
    assert SINGLE.agreement(merged, expert).tolist() == [True, True]
    assert MULTI.agreement(merged, expert).tolist() == [[True, False], [False, False]]
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert TOKEN.agreement(tokens, tokens.flip(-1)).tolist() == [[False, False]]


def test_stock_config_of_each_kind() -> None:
    assert stock_kind(True, None) is TOKEN
    assert stock_kind(True, MULTI_LABEL_PROBLEM_TYPE) is TOKEN  # the architecture decides
    assert stock_kind(False, MULTI_LABEL_PROBLEM_TYPE) is MULTI
    assert stock_kind(False, "single_label_classification") is SINGLE
    assert stock_kind(False, None) is SINGLE
    assert [k.stock_problem_type for k in HEAD_KINDS.values()] == [None, MULTI_LABEL_PROBLEM_TYPE, None]
    assert [k.card_note for k in HEAD_KINDS.values()] == ["", " (multi-label)", " (token classification)"]


def test_each_kind_names_an_evaluation_scorer_and_a_data_field() -> None:
    from guardmerge.data import Examples

    assert all(kind.metric in SCORERS for kind in HEAD_KINDS.values())
    fields = set(Examples.__dataclass_fields__)
    assert all(kind.gold in fields for kind in HEAD_KINDS.values())
    assert [k.gold for k in HEAD_KINDS.values()] == ["labels", "label_sets", "tags"]


def test_the_table_is_read_without_torch() -> None:
    code = "import sys, guardmerge.models.head_kinds, guardmerge.models.benign; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"
