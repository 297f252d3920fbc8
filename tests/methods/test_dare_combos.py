"""DARE in front of RegMean and Fisher: registration, parameters, and the drop against the reference."""

from __future__ import annotations

import torch

from guardmerge.methods import METHODS, Role, TensorContext, reference
from guardmerge.methods.fisher_merging import fisher, fisher_norms
from guardmerge.methods.regmean import regmean
from guardmerge.methods.ties import drop

NAME = "encoder.layer.0.output.dense.weight"


def test_registered_as_the_merger_with_a_dare_sparsify_step() -> None:
    dare_regmean, dare_fisher = METHODS.get("dare_regmean"), METHODS.get("dare_fisher")
    assert (dare_regmean.fn, dare_regmean.needs, dare_regmean.sparsify) == (regmean, frozenset({"gram"}), drop)
    assert (dare_fisher.fn, dare_fisher.needs, dare_fisher.sparsify) == (fisher, frozenset({"fisher"}), drop)
    assert dare_fisher.prepare is fisher_norms and dare_regmean.prepare is None


def test_parameters_are_dares_then_the_mergers() -> None:
    assert list(METHODS.get("dare_regmean").params.model_fields) == [
        *("density", "scaling", "rescale", "rescale_by", "seed"),
        *("alpha", "ridge"),
    ]
    assert list(METHODS.get("dare_fisher").params.model_fields)[5:] == ["eps", "normalize"]
    p = METHODS.get("dare_regmean").validate({})
    assert (p.density, p.scaling, p.alpha, p.seed) == (0.5, 1.0, 1.0, None)  # the merger's scaling default


def test_drop_is_the_reference_dare_with_the_tensors_generator() -> None:
    deltas = torch.randn(3, 6, 9, generator=torch.Generator().manual_seed(0))
    spec = METHODS.get("dare_fisher")
    ctx = TensorContext(NAME, Role.LINEAR_WEIGHT, seed=5)
    for raw in ({}, {"density": 0.3, "seed": 11}, {"rescale": False}):
        params = spec.validate(raw)
        want = reference.dare(deltas, params.density, ctx.generator(params.seed), params.rescale, params.rescale_by)
        assert torch.equal(drop(deltas, params, ctx), want)


def test_density_one_is_the_plain_merger() -> None:
    deltas = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    fishers = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(2))
    spec = METHODS.get("dare_fisher")
    params = spec.validate({"density": 1.0})
    ctx = TensorContext(NAME, Role.LINEAR_WEIGHT, stats={"fisher": fishers})
    dropped = spec.sparsify(deltas, params, ctx) if spec.sparsify else deltas
    plain = METHODS.get("fisher")
    assert torch.equal(
        spec.fn(dropped, torch.ones(2), params, ctx), plain.fn(deltas, torch.ones(2), plain.validate({}), ctx)
    )
