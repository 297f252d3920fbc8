"""Benign labels of a head: given and checked, or guessed from the names (a guess never silences a
label), and an exclusive (single-label) head whose benign labels cannot be guessed is refused."""

from __future__ import annotations

import logging

import pytest

from guardmerge.errors import GuardmergeError
from guardmerge.models.benign import guess_benign, resolve_benign


@pytest.mark.parametrize(
    ("labels", "benign", "ambiguous"),
    [
        (["not-hate", "hate"], ["not-hate"], []),
        (["Neutral", "toxic"], ["Neutral"], []),
        (["non_irony", "irony"], ["non_irony"], []),
        (["SAFE", "not safe"], ["SAFE"], ["not safe"]),  # negates a benign name: not benign
        (["not_safe_for_work", "sfw"], [], ["not_safe_for_work"]),  # negates no label of the head
        (["anger", "joy"], [], []),
        (["LABEL_0", "LABEL_1"], [], []),
    ],
)
def test_guess_benign(labels: list[str], benign: list[str], ambiguous: list[str]) -> None:
    assert guess_benign(labels) == (benign, ambiguous)


def test_resolve_benign_takes_given_labels_and_checks_them() -> None:
    assert resolve_benign("emo", ["anger", "joy"], "single_label", ["joy"], "--benign") == frozenset({"joy"})
    assert resolve_benign("emo", ["anger", "joy"], "single_label", [], "--benign") == frozenset()
    with pytest.raises(GuardmergeError, match="unknown label.*calm.*its labels are anger, joy"):
        resolve_benign("emo", ["anger", "joy"], "single_label", ["calm"], "--benign")


def test_resolve_benign_guesses_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="guardmerge"):
        assert resolve_benign("hate", ["not-hate", "hate"], "single_label", None, "--benign") == {"not-hate"}
        assert resolve_benign("tox", ["insult", "not_safe_x"], "multi_label", None, "--benign x") == frozenset()
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "taken as benign (guessed from their names): not-hate" in messages
    assert "not_safe_x" in messages and "--benign x" in messages  # the ambiguous name flags, with a warning
    assert "no label looks benign: every label flags" in messages


def test_resolve_benign_refuses_to_guess_a_single_label_head() -> None:
    with pytest.raises(GuardmergeError, match="name them with --benign emo=LABEL"):
        resolve_benign("emo", ["anger", "joy"], "single_label", None, "--benign emo=LABEL")
    assert resolve_benign("one", ["spam"], "single_label", None, "x") == frozenset()  # one label: nothing to guess


def test_guessed_benign_labels_ignore_case_and_separators() -> None:
    labels = ["Neutral", "toxic", "non-toxic", "NOT_HATE", "hate", "safe", "clean", "none", "normal", "x"]
    assert guess_benign(labels) == (["Neutral", "non-toxic", "NOT_HATE", "safe", "clean", "none", "normal"], [])


def test_resolve_benign_refuses_an_unknown_kind() -> None:
    with pytest.raises(GuardmergeError, match="unknown head kind 'regression'"):
        resolve_benign("x", ["a", "b"], "regression", None, "--benign")
