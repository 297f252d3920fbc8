"""The search front door's argument readers (the study itself is tested in test_study.py)."""

from __future__ import annotations

import pytest

from guardmerge.errors import ConfigError
from guardmerge.search.run import parse_task_weights, parse_weight_range


def test_weight_range_reads_low_high_and_names_a_bad_one() -> None:
    assert parse_weight_range(None) is None
    assert parse_weight_range("0.5,3") == (0.5, 3.0)
    with pytest.raises(ConfigError, match="--weights '0.5' must look like LOW,HIGH"):
        parse_weight_range("0.5")


def test_task_weights_read_task_equals_number() -> None:
    assert parse_task_weights(["injection=2", " hate = 0.5"]) == {"injection": 2.0, "hate": 0.5}
    with pytest.raises(ConfigError, match="--task-weight 'injection' must look like TASK=W"):
        parse_task_weights(["injection"])
    with pytest.raises(ConfigError, match="'two' is not a number"):
        parse_task_weights(["injection=two"])
