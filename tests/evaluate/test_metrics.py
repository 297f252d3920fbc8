"""The evaluation layer's metrics for multi-label and token tasks."""

from __future__ import annotations

import pytest

from guardmerge.evaluate import multi_label_metrics, token_metrics

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def test_token_metrics_are_entity_level_and_strict_iob2() -> None:
    gold = [[1, 2, 0, 3], [0, 3, 4]]
    # one PER right, the LOC of row 0 missed, the LOC of row 1 cut short (a wrong span)
    pred = [[1, 2, 0, 0], [0, 3, 0]]
    m = token_metrics(gold, pred, TAGS)
    # 3 gold entities, 2 predicted, 1 right: precision 1/2, recall 1/3
    assert m["micro_f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert m["f1/PER"] == 1.0 and m["f1/LOC"] == 0.0 and m["macro_f1"] == 0.5
    # strict IOB2: an entity that starts with I- is not an entity
    assert token_metrics([[1, 2]], [[2, 2]], TAGS)["micro_f1"] == 0.0


def test_multi_label_metrics_macro_micro_and_per_label() -> None:
    m = multi_label_metrics([[0, 1], [2], []], [[0], [2], [1]], ["a", "b", "c"])
    assert m["f1/a"] == 1.0 and m["f1/b"] == 0.0 and m["f1/c"] == 1.0
    assert m["macro_f1"] == pytest.approx(2 / 3)
    # 3 true labels, 3 predicted, 2 right
    assert m["micro_f1"] == pytest.approx(2 / 3)
    assert m["exact_match"] == pytest.approx(1 / 3)
