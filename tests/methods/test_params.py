"""The shared parameter fields: bounds, descriptions and search ranges defined once, defaults per method."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from guardmerge.errors import ConfigError
from guardmerge.methods import METHODS, MethodParams
from guardmerge.methods import params as shared
from guardmerge.methods.params import Consensus, Scope
from guardmerge.methods.registry import MethodSpec


class Toy(MethodParams):
    density: float = shared.density(0.4, detail=" (toy)", search=(0.1, 0.9))
    scaling: float = shared.scaling(0.7)
    ridge: float = shared.ridge()
    alpha: float = shared.alpha(search=(0.5, 1.0))
    rho: float = shared.rho(2.0, description="toy pull")
    scope: Scope = shared.scope("per_tensor")
    consensus: Consensus = shared.consensus()
    lr: float = shared.lr(0.01, search=(1e-3, 0.1))
    texts: int = shared.texts(10)
    max_length: int = shared.max_length()
    batch_size: int = shared.batch_size(4)


def _spec() -> MethodSpec[Toy]:
    return MethodSpec("toy", lambda d, w, p, c: d.sum(0), Toy, "toy", needs=frozenset())


def test_defaults_descriptions_and_search_ranges() -> None:
    p = Toy()
    assert (p.density, p.scaling, p.ridge, p.alpha, p.rho, p.scope, p.consensus) == (
        0.4,
        0.7,
        1e-6,
        1.0,
        2.0,
        "per_tensor",
        "mean",
    )
    assert (p.lr, p.texts, p.max_length, p.batch_size) == (0.01, 10, 128, 4)
    fields = Toy.model_fields
    assert fields["density"].description == shared.DENSITY + " (toy)"
    assert fields["scaling"].description == shared.SCALING
    space = _spec().search_space()
    assert set(space) == {"density", "alpha", "lr"}
    assert (space["density"].low, space["density"].high, space["lr"].log) == (0.1, 0.9, True)


@pytest.mark.parametrize(
    "bad",
    [
        {"density": 0.0},
        {"density": 1.1},
        {"ridge": -1.0},
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"rho": -1.0},
        {"scope": "layer"},
        {"consensus": "max"},
        {"lr": 0.0},
        {"texts": 1},
        {"max_length": 4},
        {"batch_size": 0},
    ],
)
def test_bounds_are_enforced(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Toy(**bad)


def test_every_method_takes_its_shared_fields_from_here() -> None:
    """Each shared field's description starts with the shared text, or is a method's own wording of
    a narrower meaning (kept as it was)."""
    own = {("pcb", "density"), ("task_arithmetic", "scaling"), ("model_stock", "scaling"), ("pcb", "scope")}
    shared_text = {"density": shared.DENSITY, "scaling": shared.SCALING, "scope": shared.SCOPE}
    for spec in METHODS:
        for name, text in shared_text.items():
            field = spec.params.model_fields.get(name)
            if field is not None and (spec.name, name) not in own:
                assert (field.description or "").startswith(text), (spec.name, name)


def test_each_method_keeps_its_own_default() -> None:
    scaling = {s.name: s.validate({}).scaling for s in METHODS if "scaling" in s.params.model_fields}
    assert {name for name, v in scaling.items() if v == 0.3} == {"task_arithmetic", "dare_linear", "breadcrumbs"}
    assert METHODS.get("wudi").validate({}).rho == 3.0 and METHODS.get("lot").validate({}).rho == 0.0
    assert (
        METHODS.get("ties").validate({}).scope == "global"
        and METHODS.get("breadcrumbs").validate({}).scope == "per_tensor"
    )


def test_nonfinite_method_parameter_refused_for_every_method() -> None:
    from guardmerge.methods import METHODS

    checked = 0
    for spec in METHODS:
        for pname, finfo in spec.params.model_fields.items():
            if finfo.annotation is float:
                with pytest.raises(ConfigError, match="finite"):
                    spec.validate({pname: float("nan")})
                checked += 1
    assert checked >= 5
