"""What heads answer (models/outputs.py): activations, thresholds, multi-label results, token rows and
word tags (entity spans against transformers' pipeline: tests/models/test_head_kinds_end_to_end.py)."""

from __future__ import annotations

import numpy as np
import pytest

from guardmerge.errors import GuardmergeError
from guardmerge.models.outputs import (
    TextTokens,
    entity_spans,
    entity_types,
    label_thresholds,
    multi_label_result,
    sigmoid,
    softmax,
    token_rows,
    word_tags,
)


def test_softmax_and_sigmoid_are_stable_for_large_logits() -> None:
    np.testing.assert_allclose(softmax(np.array([1000.0, 1000.0])), [0.5, 0.5])
    np.testing.assert_allclose(sigmoid(np.array([-1000.0, 0.0, 1000.0])), [0.0, 0.5, 1.0])


def test_label_thresholds_given_then_stored_then_the_default() -> None:
    assert label_thresholds(["a", "b", "c"], {"b": 0.7}, {"c": 0.2}) == [0.5, 0.7, 0.2]
    assert label_thresholds(["a", "b"], {"b": 0.7}, 0.9) == [0.9, 0.9]
    with pytest.raises(GuardmergeError, match="unknown label"):
        label_thresholds(["a"], None, {"z": 0.1})


def test_multi_label_result_keeps_labels_at_or_above_their_thresholds() -> None:
    out = multi_label_result(np.array([0.5, 0.49, 0.9]), ["a", "b", "c"], [0.5, 0.5, 0.95])
    assert out["labels"] == ["a"]
    assert out["probabilities"] == pytest.approx({"a": 0.5, "b": 0.49, "c": 0.9})


def test_token_rows_take_a_texts_own_rows_on_either_padding_side() -> None:
    rows = np.arange(8.0).reshape(4, 2)
    assert token_rows(rows, 2).tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert token_rows(rows, 2, "left").tolist() == [[4.0, 5.0], [6.0, 7.0]]
    with pytest.raises(GuardmergeError, match="4 token rows for a text of 5 tokens"):
        token_rows(rows, 5)


def test_entity_types_and_word_tags() -> None:
    assert entity_types(["O", "B-PER", "I-PER", "B-LOC"]) == ["PER", "LOC"]
    tokens = TextTokens(((0, 0), (0, 3), (4, 6), (6, 8), (0, 0)), (True, False, False, False, True),
                        (False, False, False, True, False))  # fmt: skip
    # "Ann went far": the third word is cut (no token covers it); "went" takes its first piece's tag
    assert word_tags(["Ann", "went", "far"], tokens, [0, 1, 2, 3, 0], outside=0) == [1, 2, 0]


def test_entity_spans_join_a_b_tag_with_its_i_tags() -> None:
    tokens = TextTokens(((0, 3), (4, 7), (8, 11)), (False, False, False), (False, False, False))
    probs = np.eye(3)[[1, 2, 0]]  # B-PER, I-PER, O
    spans = entity_spans("Ann Lee ran", tokens, probs, ["O", "B-PER", "I-PER"])
    assert spans == [{"label": "PER", "start": 0, "end": 7, "text": "Ann Lee", "score": 1.0}]
    with pytest.raises(GuardmergeError, match="unknown aggregation"):
        entity_spans("x", tokens, probs, ["O", "B-PER", "I-PER"], "max")
