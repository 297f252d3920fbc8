"""The search space comes from the method registry; candidates round-trip through trials."""

from __future__ import annotations

import optuna
import pytest

from guardmerge.errors import ConfigError
from guardmerge.methods import METHODS, SearchRange
from guardmerge.search import build_space


def test_every_declared_range_lies_inside_its_parameter_constraints() -> None:
    for spec in METHODS:
        for name, r in spec.search_space().items():
            for value in (r.low, r.high):
                v = int(value) if r.integer else value
                spec.validate({name: v})  # raises ConfigError if a bound is not a valid value


def test_space_reads_ranges_from_the_schema_and_fixes_the_rest() -> None:
    space = build_space(
        "dare_ties", {"consensus": "sum", "scaling": 0.9}, ["a", "b"], [1.0, 1.0], only=["density", "seed"]
    )
    assert space.ranges == {"density": SearchRange(0.1, 1.0), "seed": SearchRange(0, 9999, integer=True)}
    assert space.fixed == {"consensus": "sum", "scaling": 0.9}
    assert space.dimensions == 2


def test_suggested_candidates_respect_ranges_and_round_trip() -> None:
    space = build_space("ties", {}, ["a", "b", "c"], [1.0, 1.0, 1.0], weight_range=(0.5, 3.0))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(20):
        trial = study.ask()
        c = space.suggest(trial)
        assert 0.05 <= c.parameters["density"] <= 1.0 and 0.5 <= c.parameters["scaling"] <= 2.5
        assert len(c.weights) == 3 and all(0.5 <= w <= 3.0 for w in c.weights)
        study.tell(trial, 0.0)
        assert space.from_values(study.trials[-1].params) == c
    assert space.dimensions == 5


def test_weights_only_search_and_dare_seed_is_an_integer() -> None:
    space = build_space("task_arithmetic", {"scaling": 0.4}, ["a"], [2.0], only=[], weight_range=(0.0, 1.0))
    assert space.ranges == {} and space.fixed == {"scaling": 0.4}
    trial = optuna.create_study().ask()
    assert isinstance(build_space("dare_linear", {}, ["a"], [1.0]).suggest(trial).parameters["seed"], int)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "ties", "only": ["alpha"]}, "no parameter 'alpha'"),
        ({"method": "ties", "only": ["scope"]}, "declares no search range"),
        ({"method": "average"}, "nothing to search"),
        ({"method": "ties", "weight_range": (2.0, 1.0)}, "weight range"),
    ],
)
def test_bad_spaces_are_refused_with_the_reason(kwargs: dict, message: str) -> None:
    method = kwargs.pop("method")
    with pytest.raises(ConfigError, match=message):
        build_space(method, {}, ["a"], [1.0], **kwargs)
