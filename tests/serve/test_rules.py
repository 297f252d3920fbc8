"""Head rules: thresholds, benign labels and flagged entity types fixed per head from the settings; settings that
name an unknown task, label or entity type, or a head of the wrong kind, are refused."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

pytest.importorskip("pydantic")

from guardmerge.errors import GuardmergeError
from guardmerge.serve.rules import HeadRule, check_tasks, head_info, head_rules
from guardmerge.serve.schemas import HeadInfo, MultiLabelHeadInfo, TokenHeadInfo
from guardmerge.serve.settings import ServeSettings


class Heads:
    """A backend of four heads of every kind, with a stored threshold and stored benign labels."""

    name = "stub"
    info: ClassVar[dict[str, Any]] = {}
    HEADS: ClassVar[dict[str, tuple[str, list[str], dict[str, float], list[str] | None]]] = {
        "inj": ("single_label", ["benign", "injection"], {}, None),
        "emo": ("single_label", ["anger", "joy"], {}, ["joy"]),
        "tox": ("multi_label", ["insult", "threat"], {"threat": 0.8}, None),
        "pii": ("token", ["O", "B-PER", "I-PER", "B-LOC"], {}, None),
    }

    @property
    def tasks(self) -> list[str]:
        return list(self.HEADS)

    def labels(self, task: str) -> list[str]:
        return self.HEADS[task][1]

    def problem(self, task: str) -> str:
        return self.HEADS[task][0]

    def thresholds(self, task: str) -> dict[str, float]:
        return self.HEADS[task][2]

    def benign(self, task: str) -> list[str] | None:
        return self.HEADS[task][3]

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def test_rules_of_every_head_kind() -> None:
    settings = ServeSettings(thresholds={"tox.insult": 0.3, "inj": 0.7}, flag_entities={"pii": ["PER"]})
    rules = head_rules(Heads(), settings)
    assert list(rules) == ["inj", "emo", "tox", "pii"]
    assert rules["inj"] == HeadRule("single_label", ("benign", "injection"), 0.7, (0.7, 0.7), frozenset({"benign"}))
    assert rules["emo"].benign == {"joy"}  # stored with the head
    assert rules["tox"] == HeadRule("multi_label", ("insult", "threat"), 0.5, (0.3, 0.8), frozenset())
    assert rules["pii"] == HeadRule("token", ("O", "B-PER", "I-PER", "B-LOC"), 0.5, entities=frozenset({"PER"}))


def test_given_benign_labels_win_over_stored_ones() -> None:
    rules = head_rules(Heads(), ServeSettings(benign={"emo": ["anger"], "tox": ["insult"]}))
    assert rules["emo"].benign == {"anger"} and rules["tox"].benign == {"insult"}


def test_a_head_that_never_flags_needs_no_benign_labels() -> None:
    class Unnamed(Heads):
        HEADS: ClassVar[dict[str, Any]] = {"emo": ("single_label", ["anger", "optimism"], {}, None)}

    with pytest.raises(GuardmergeError, match="--benign emo=LABEL"):
        head_rules(Unnamed(), ServeSettings())
    assert head_rules(Unnamed(), ServeSettings(thresholds={"emo": None}))["emo"].benign == frozenset()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"thresholds": {"spam": 0.5}}, "threshold for unknown task(s) spam; this model has: inj, emo, tox, pii"),
        ({"thresholds": {"pii.PER": 0.5}}, "token head 'pii' has no per-label thresholds"),
        ({"thresholds": {"tox.rude": 0.5}}, "head 'tox' has no label 'rude'; its labels are insult, threat"),
        ({"benign": {"spam": ["x"]}}, "--benign: unknown task 'spam'"),
        ({"benign": {"pii": ["O"]}}, "--benign pii: applies to single-label and multi-label heads; 'pii' is token"),
        ({"flag_entities": {"inj": ["PER"]}}, "--flag-entities inj: applies to token heads"),
        ({"flag_entities": {"pii": ["ORG"]}}, "unknown entity type(s) ORG; its types are PER, LOC"),
        ({"benign": {"inj": ["safe"]}}, "unknown label(s) safe"),
        ({"aggregation": "max"}, "unknown aggregation 'max'"),
    ],
)
def test_settings_that_do_not_fit_the_model_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(GuardmergeError) as caught:
        head_rules(Heads(), ServeSettings(**settings))
    assert message in str(caught.value)


def test_check_tasks_names_every_unknown_task() -> None:
    check_tasks(["a", "b"], ServeSettings(thresholds={"a": 0.5, "b.x": 0.1}))
    with pytest.raises(GuardmergeError, match=r"unknown task\(s\) x, y; this model has: a, b"):
        check_tasks(["a", "b"], ServeSettings(thresholds={"y.l": 0.5, "x": 0.1, "a": 0.2}))


def test_head_info_of_every_kind() -> None:
    rules = head_rules(Heads(), ServeSettings(thresholds={"tox.insult": 0.3}, aggregation="simple"))
    infos = {t: head_info(t, rule, "simple") for t, rule in rules.items()}
    assert type(infos["inj"]) is HeadInfo
    assert infos["inj"].model_dump() == {
        "task": "inj",
        "labels": ["benign", "injection"],
        "threshold": 0.5,
        "benign": ["benign"],
    }
    assert isinstance(infos["tox"], MultiLabelHeadInfo)
    assert infos["tox"].label_thresholds == {"insult": 0.3, "threat": 0.8} and infos["tox"].problem == "multi_label"
    assert isinstance(infos["pii"], TokenHeadInfo)
    assert infos["pii"].entity_types == ["PER", "LOC"] and infos["pii"].flag_entities is None
    assert infos["pii"].aggregation == "simple"
