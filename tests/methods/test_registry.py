"""The registry: one way to register, explicit needs, validation and the parameter table."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from guardmerge.errors import ConfigError
from guardmerge.methods import METHODS, MethodParams, MethodSpec, TensorContext
from guardmerge.methods.registry import Registry


class _Params(MethodParams):
    scale: float = 1.0


def _fn(deltas: torch.Tensor, weights: torch.Tensor, params: _Params, ctx: TensorContext) -> torch.Tensor:
    return params.scale * deltas.sum(0)


def _spec(name: str = "toy") -> MethodSpec[_Params]:
    return MethodSpec(name=name, fn=_fn, params=_Params, summary="a toy method", needs=frozenset())


def test_register_is_the_one_way_and_refuses_a_name_twice() -> None:
    registry = Registry()
    spec = registry.register(_spec())
    assert registry.get("toy") is spec and "toy" in registry and registry.names() == ["toy"]
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(_spec())
    assert not hasattr(registry, "register_like") and not hasattr(registry, "method")
    with pytest.raises(ConfigError, match="Known methods: toy"):
        registry.get("other")


def test_every_spec_declares_its_needs() -> None:
    needs = next(f for f in dataclasses.fields(MethodSpec) if f.name == "needs")
    assert needs.default is dataclasses.MISSING  # no default to fall back on, nothing inferred
    with pytest.raises(TypeError):
        MethodSpec(name="toy", fn=_fn, params=_Params, summary="s")  # type: ignore[call-arg]
    data = {"regmean": {"gram"}, "dare_regmean": {"gram"}, "fisher": {"fisher"}, "dare_fisher": {"fisher"}}
    assert {s.name: set(s.needs) for s in METHODS if s.needs} == data


def test_validate_and_parameter_rows() -> None:
    spec = _spec()
    assert spec.validate({"scale": 2}).scale == 2.0
    with pytest.raises(ConfigError, match="Known parameters: scale"):
        spec.validate({"lambda": 1.0})
    with pytest.raises(ConfigError):
        spec.validate({"scale": float("nan")})
    assert spec.parameter_rows() == [("scale", "float", "1.0", "")]
    assert spec.search_space() == {}
