"""The flag rule shared by the server and the scanners: label and entity flags, and the command-line parsers of
thresholds and label lists (benign labels: tests/models/test_benign.py)."""

from __future__ import annotations

import numpy as np
import pytest

from guardmerge.errors import GuardmergeError, InvalidTextError
from guardmerge.serve.flags import (
    entity_flag,
    flag_score,
    is_flagged,
    label_flag,
    normalise_texts,
    parse_label_lists,
    parse_thresholds,
)


def test_flag_score_and_is_flagged() -> None:
    probs = np.array([0.6, 0.3, 0.1])
    assert flag_score(probs, {0}) == pytest.approx(0.3)
    assert flag_score(probs, set()) == pytest.approx(0.6)
    assert flag_score(probs, {0, 1, 2}) is None
    assert is_flagged(0.3, 0.3) and not is_flagged(0.29, 0.3)
    assert not is_flagged(None, 0.1) and not is_flagged(0.9, None)


def test_label_flag_uses_each_label_threshold() -> None:
    probs = np.array([0.2, 0.5, 0.3])
    assert label_flag(probs, [0.5, 0.5, 0.5], {0})  # 0.5 >= 0.5
    assert not label_flag(probs, [0.1, 0.6, 0.4], {0})
    assert not label_flag(probs, [0.1, None, None], {0})  # None: the label never flags
    assert label_flag(probs, [0.1, None, None], set())


def test_entity_flag() -> None:
    spans = [{"label": "PER"}, {"label": "LOC"}]
    assert entity_flag(spans, None) and entity_flag(spans, {"LOC"})
    assert not entity_flag(spans, {"ORG"}) and not entity_flag([], None)
    assert not entity_flag(spans, None, threshold=None)  # the head's flag is off
    assert entity_flag(spans, None, threshold=0.99)  # numbers do not filter entities


def test_normalise_texts() -> None:
    texts, bad = normalise_texts(["cafe\u0301", "ok", "x \ud800 y", "\udfff"])
    assert texts == ["caf\u00e9", "ok"]
    assert [e.index for e in bad] == [2, 3] and all(isinstance(e, InvalidTextError) for e in bad)
    assert bad[0].position == 2 and "U+D800" in str(bad[0])


def test_parse_thresholds() -> None:
    assert parse_thresholds(["injection=0.8", " hate = 1 ", "emotion=off"]) == {
        "injection": 0.8,
        "hate": 1.0,
        "emotion": None,
    }
    for bad, msg in [("injection", "task=0.8"), ("x=1.5", "outside"), ("x=abc", "not a number"), ("=0.1", "task=0.8")]:
        with pytest.raises(GuardmergeError, match=msg):
            parse_thresholds([bad])


def test_parse_thresholds_per_label() -> None:
    assert parse_thresholds(["tox . insult = 0.7", "tox.threat=None", "tox=0"]) == {
        "tox.insult": 0.7,
        "tox.threat": None,
        "tox": 0.0,
    }
    for bad in (".insult=0.5", "tox.=0.5", "x=nan", "x="):
        with pytest.raises(GuardmergeError, match="threshold"):
            parse_thresholds([bad])


def test_parse_label_lists() -> None:
    assert parse_label_lists(["tox=neutral, clean", "tox=ok", "pii=", " emo = joy,,"]) == {
        "tox": ["neutral", "clean", "ok"],
        "pii": [],
        "emo": ["joy"],
    }
    with pytest.raises(GuardmergeError, match="^--flag-entities 'pii' must look like task=NAME1,NAME2"):
        parse_label_lists(["pii"], "--flag-entities")
    with pytest.raises(GuardmergeError, match="--benign '=a'"):
        parse_label_lists(["=a"])
