"""ServeSettings: every field bounded (NaN and infinity refused), thresholds, API keys, each field's flag."""

from __future__ import annotations

import math
from typing import Any

import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

from guardmerge.errors import GuardmergeError  # noqa: E402
from guardmerge.serve import ServeSettings, create_app  # noqa: E402
from guardmerge.serve.settings import CLI, Flag, check_api_key, check_seconds, cli_flag, public_model_name  # noqa: E402
from tests.serve.conftest import Scores, TwoHeads  # noqa: E402


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch", 0),
        ("max_batch", 1025),
        ("max_texts", 10_001),
        ("max_chars", 1_000_001),
        ("max_queue", 1_000_001),
        ("max_queue", 0),
        ("max_wait_ms", math.nan),
        ("max_wait_ms", math.inf),
        ("max_wait_ms", 1e308),
        ("max_wait_ms", -1.0),
        ("body_timeout", math.nan),
        ("body_timeout", math.inf),
        ("body_timeout", 0.0),
        ("inference_timeout", -1.0),
        ("inference_timeout", math.nan),
        ("inference_timeout", math.inf),
        ("default_threshold", math.nan),
        ("max_texts", True),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(GuardmergeError, match=field) as caught:
        ServeSettings(**{field: value})
    assert "\n" not in str(caught.value)
    settings = ServeSettings()
    setattr(settings, field, value)  # changed after it was made: create_app checks again
    with pytest.raises(GuardmergeError, match=field):
        create_app(TwoHeads(), settings)


@pytest.mark.parametrize("key", ["", "   ", "\t\n", " padded "])
def test_blank_api_key_is_refused(key: str) -> None:
    with pytest.raises(GuardmergeError, match="API key"):
        create_app(Scores(), ServeSettings(api_key=key))


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("/home/me/models/bert-base", "bert-base"),
        ("/srv/m/", "m"),
        ("C:\\Users\\me\\bert", "bert"),
        ("~/models/x", "x"),
        ("./local/y", "y"),
        ("org/name", "org/name"),
        ("bert-base-uncased", "bert-base-uncased"),
    ],
)
def test_public_model_name(value: str, shown: str) -> None:
    assert public_model_name(value) == shown


def test_label_threshold_precedence() -> None:
    settings = ServeSettings(thresholds={"tox": 0.7, "tox.insult": 0.2, "off": None}, default_threshold=0.4)
    assert settings.label_threshold("tox", "insult", {"insult": 0.9}) == 0.2  # task.label here
    assert settings.label_threshold("tox", "threat", {"threat": 0.9}) == 0.7  # task here
    assert settings.label_threshold("emo", "joy", {"joy": 0.9}) == 0.9  # the head's stored one
    assert settings.label_threshold("emo", "joy") == 0.4  # the default
    assert settings.label_threshold("off", "x") is None
    assert settings.threshold("tox") == 0.7 and settings.threshold("emo") == 0.4 and settings.threshold("off") is None


def test_check_api_key() -> None:
    check_api_key(None)
    check_api_key("k3y")
    with pytest.raises(GuardmergeError, match="^--api-key is empty or blank"):
        check_api_key(" ", "--api-key")
    with pytest.raises(GuardmergeError, match="whitespace"):
        check_api_key("k3y\n")


def test_check_seconds_names_the_field_and_its_flag() -> None:
    check_seconds("body_timeout", 3600)
    with pytest.raises(GuardmergeError, match=r"^body_timeout \(--body-timeout\) must be .* 3600 \(got 3601\)"):
        check_seconds("body_timeout", 3601)
    with pytest.raises(GuardmergeError, match=r"x \(--other\)"):
        check_seconds("x", True, "--other")


def test_every_field_is_declared_with_its_flag() -> None:
    import dataclasses

    fields = {f.name: f.metadata[CLI] for f in dataclasses.fields(ServeSettings)}
    assert all(isinstance(how, Flag) and how.help.endswith((".", ")")) for how in fields.values())
    assert fields["thresholds"].name == "--threshold" and fields["api_key"].envvar == "GUARDMERGE_API_KEY"
    assert fields["thresholds"].parse(["hate=0.8", "x=off"]) == {"hate": 0.8, "x": None}
    assert fields["benign"].parse(None) == {} and fields["flag_entities"].parse(["pii=PER,LOC"]) == {
        "pii": ["PER", "LOC"]
    }
    with pytest.raises(GuardmergeError, match="--flag-entities 'pii'"):
        fields["flag_entities"].parse(["pii"])
    assert cli_flag("Help.", name="--x") == {CLI: Flag("Help.", name="--x")}


def test_settings_are_positional_in_their_historical_order() -> None:
    settings = ServeSettings(8, 100, 4, 1.0, 16, {"a": 0.1}, 0.2, "k", 5.0, {"b": ["x"]}, {"c": ["PER"]}, "simple", 6.0)
    assert (settings.max_texts, settings.max_chars, settings.max_batch, settings.max_wait_ms) == (8, 100, 4, 1.0)
    assert (settings.max_queue, settings.thresholds, settings.default_threshold, settings.api_key) == (
        16,
        {"a": 0.1},
        0.2,
        "k",
    )
    assert (settings.body_timeout, settings.benign, settings.flag_entities) == (5.0, {"b": ["x"]}, {"c": ["PER"]})
    assert (settings.aggregation, settings.inference_timeout) == ("simple", 6.0)
