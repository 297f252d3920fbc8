"""The sparsify x consensus table: task arithmetic, TIES, DARE-linear, DARE-TIES, breadcrumbs,
breadcrumbs-TIES as registered methods, and against the whole-tensor reference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

from guardmerge.errors import ConfigError
from guardmerge.methods import METHODS, reference
from guardmerge.methods.registry import Role, TensorContext
from guardmerge.methods.ties import CRUMBS, DARE, ELECT, LINEAR, TRIM
from guardmerge.methods.ties import FAMILY as ROWS

NAME = "encoder.layer.0.output.dense.weight"
FAMILY = ["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]


def run(
    method: str,
    deltas: torch.Tensor,
    weights: torch.Tensor | None = None,
    name: str = NAME,
    globals_: Mapping[str, torch.Tensor] | None = None,
    run_seed: int = 0,
    **raw: Any,
) -> torch.Tensor:
    spec = METHODS.get(method)
    params = spec.validate(raw)
    w = torch.ones(deltas.shape[0]) if weights is None else weights
    ctx = TensorContext(name, Role.LINEAR_WEIGHT, globals=globals_ or {}, seed=run_seed)
    return spec.fn(deltas, w, params, ctx)


def merge_model(
    method: str, tensors: dict[str, torch.Tensor], weights: torch.Tensor | None = None, **raw: Any
) -> dict[str, torch.Tensor]:
    """What the engine does: prepare over a stream, then one call per tensor."""
    spec = METHODS.get(method)
    params = spec.validate(raw)
    n = next(iter(tensors.values())).shape[0]
    w = torch.ones(n) if weights is None else weights

    def stream():
        for name, t in tensors.items():
            yield TensorContext(name, Role.LINEAR_WEIGHT), t

    g = spec.prepare(params, stream) if spec.prepare else {}
    return {
        name: spec.fn(t, w, params, TensorContext(name, Role.LINEAR_WEIGHT, globals=g)) for name, t in tensors.items()
    }


TAU = torch.tensor(
    [
        [1.0, -2.0, 0.5, 3.0],
        [-1.5, 1.0, 0.25, -0.5],
        [2.0, -0.5, -4.0, 2.5],
    ]
)


# ---------------------------------------------------------------------------------- the table


def test_the_table_has_one_row_per_registered_method() -> None:
    steps = {row.name: (row.sparsify, row.consensus, row.params) for row in ROWS}
    assert steps == {
        "task_arithmetic": (None, LINEAR, METHODS.get("task_arithmetic").params),
        "ties": (TRIM, ELECT, METHODS.get("ties").params),
        "dare_linear": (DARE, LINEAR, METHODS.get("dare_linear").params),
        "dare_ties": (DARE, ELECT, METHODS.get("dare_ties").params),
        "breadcrumbs": (CRUMBS, LINEAR, METHODS.get("breadcrumbs").params),
        "breadcrumbs_ties": (CRUMBS, ELECT, METHODS.get("breadcrumbs_ties").params),
    }
    for row in ROWS:
        spec = METHODS.get(row.name)
        assert (spec.summary, spec.reference, spec.needs) == (row.summary, row.reference, frozenset())
        # a whole-model pre-pass exactly where the sparsify step ranks over a scope
        assert (spec.prepare is not None) == (row.sparsify in (TRIM, CRUMBS))


WEIGHTS = torch.tensor([0.3, 0.5, 0.21])


def reference_merge(method: str, deltas: torch.Tensor, weights: torch.Tensor, **raw: Any) -> torch.Tensor:
    """The whole-tensor reference of one row, per tensor, with the registered method's defaults."""
    p = METHODS.get(method).validate(raw)
    gen = TensorContext(NAME, Role.LINEAR_WEIGHT).generator(getattr(p, "seed", None))
    if method == "task_arithmetic":
        return reference.task_arithmetic(deltas, weights, p.scaling)
    if method == "ties":
        return reference.ties(deltas, weights, p.density, p.scaling, p.consensus)
    if method.startswith("dare"):
        dropped = reference.dare(deltas, p.density, gen, p.rescale, p.rescale_by)
        if method == "dare_linear":
            return reference.task_arithmetic(dropped, weights, p.scaling)
        return p.scaling * reference.ties_consensus(dropped, weights, p.consensus)
    if method == "breadcrumbs":
        return reference.breadcrumbs(deltas, weights, p.density, p.gamma, p.scaling)
    return reference.breadcrumbs_ties(deltas, weights, p.density, p.gamma, p.scaling, p.consensus)


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("ties", {"scope": "per_tensor"}),
        ("ties", {"scope": "per_tensor", "density": 0.5, "consensus": "sum", "scaling": 0.7}),
        ("dare_ties", {}),
        ("dare_ties", {"rescale_by": "l1", "consensus": "sum", "density": 0.3}),
        ("dare_ties", {"rescale": False}),
        ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.05}),
        ("breadcrumbs_ties", {"scope": "global", "consensus": "sum"}),
    ],
)
def test_consensus_rows_are_bit_identical_to_the_reference(method: str, raw: dict) -> None:
    deltas = torch.round(torch.randn(3, 40, 30, generator=torch.Generator().manual_seed(6)) * 64) / 64
    deltas[1, 3] = -deltas[0, 3]  # columns summing to 0
    deltas[2, 3] = 0.0
    got = merge_model(method, {NAME: deltas}, WEIGHTS, **raw)[NAME]
    assert torch.equal(got, reference_merge(method, deltas, WEIGHTS, **raw))


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("task_arithmetic", {}),
        ("dare_linear", {}),
        ("dare_linear", {"rescale_by": "l1", "density": 0.2, "scaling": 1.0}),
        ("breadcrumbs", {"density": 0.3, "gamma": 0.05}),
    ],
)
def test_linear_rows_equal_the_reference_to_rounding(method: str, raw: dict) -> None:
    deltas = torch.randn(3, 40, 30, generator=torch.Generator().manual_seed(7))
    got = merge_model(method, {NAME: deltas}, WEIGHTS, **raw)[NAME]
    torch.testing.assert_close(got, reference_merge(method, deltas, WEIGHTS, **raw), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- golden values


def test_task_arithmetic_matches_hand_computation() -> None:
    deltas = torch.tensor([[1.0, -2.0, 0.5], [3.0, 4.0, -0.5]])
    # 0.5 * (2*[1,-2,.5] + 1*[3,4,-.5]) = 0.5 * [5, 0, 0.5]
    out = run("task_arithmetic", deltas, torch.tensor([2.0, 1.0]), scaling=0.5)
    assert torch.allclose(out, torch.tensor([2.5, 0.0, 0.25]))


def test_task_arithmetic_scaling_zero_returns_base() -> None:
    assert torch.count_nonzero(run("task_arithmetic", torch.randn(3, 5), scaling=0.0)) == 0


def test_task_arithmetic_default_scaling_is_documented_value() -> None:
    assert METHODS.get("task_arithmetic").validate({}).scaling == 0.3


def test_ties_golden_with_sign_conflicts() -> None:
    # trimmed (top 2 of 4 each): [0,-2,0,3], [-1.5,1,0,0], [0,0,-4,2.5]
    # elected signs: [-,-,-,+]; disjoint mean: [-1.5, -2, -4, (3+2.5)/2]
    out = run("ties", TAU, density=0.5, scope="per_tensor")
    assert out.tolist() == [-1.5, -2.0, -4.0, 2.75]
    out_sum = run("ties", TAU, density=0.5, scope="per_tensor", consensus="sum", scaling=2.0)
    assert out_sum.tolist() == [-3.0, -4.0, -8.0, 11.0]


def test_ties_golden_with_weights_and_zero_sum() -> None:
    # weighted trimmed: [0,-2,0,3], [-3,2,0,0], [0,0,-4,2.5]; column 1 sums to 0 and the
    # tensor's mass (-1.5) elects '-'; mean divides by the agreeing weights
    out = run("ties", TAU, torch.tensor([1.0, 2.0, 1.0]), density=0.5, scope="per_tensor")
    assert out.tolist() == [-1.5, -2.0, -4.0, 2.75]


def test_ties_golden_with_magnitude_ties() -> None:
    tau = torch.tensor([[3.0, -3.0, 3.0, 1.0], [-1.0, 2.0, -2.0, -2.0]])
    # expert 1 keeps the first two |3| (indices 0, 1); expert 2 keeps indices 1, 2
    # trimmed: [3,-3,0,0], [0,2,-2,0] -> signs [+,-,-,+] -> [3, -3, -2, 0]
    assert run("ties", tau, density=0.5, scope="per_tensor").tolist() == [3.0, -3.0, -2.0, 0.0]


def test_breadcrumbs_golden() -> None:
    tau = torch.tensor(
        [
            [0.1, -0.5, 0.3, -0.9, 0.7, 0.2, -0.4, 0.05, 0.6, -0.8],
            [0.9, 0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.05],
        ]
    )
    # density 0.3, gamma 0.1: drop the top 1, keep the next 3
    # expert 1 keeps -0.8 (9), 0.7 (4), 0.6 (8); expert 2 keeps -0.8 (8), 0.7 (7), -0.6 (6)
    e1 = [0, 0, 0, 0, 0.7, 0, 0, 0, 0.6, -0.8]
    e2 = [0, 0, 0, 0, 0, 0, -0.6, 0.7, -0.8, 0]
    out = run("breadcrumbs", tau, density=0.3, gamma=0.1, scaling=1.0)
    assert torch.allclose(out, torch.tensor(e1) + torch.tensor(e2))
    # TIES consensus: column 8 is 0.6 vs -0.8 -> '-' wins: -0.8; column 7 only 0.7
    ties_out = run("breadcrumbs_ties", tau, density=0.3, gamma=0.1)
    expected = [0, 0, 0, 0, 0.7, 0, -0.6, 0.7, -0.8, -0.8]
    assert torch.allclose(ties_out, torch.tensor(expected))


def test_dare_methods_golden_given_the_draws() -> None:
    from guardmerge.methods.fast.sparsify import expert_generators

    ctx = TensorContext(NAME, Role.LINEAR_WEIGHT)
    gens = expert_generators(ctx.generator(5), 3)
    keep = torch.stack([torch.rand(4, generator=g) < 0.5 for g in gens])
    dropped = TAU * keep / 0.5
    lin = run("dare_linear", TAU, density=0.5, seed=5, scaling=1.0)
    assert torch.allclose(lin, dropped.sum(0))
    tie = run("dare_ties", TAU, density=0.5, seed=5)
    ref = run("ties", dropped, density=1.0, scope="per_tensor")
    assert torch.equal(tie, ref)


def test_dare_uses_the_run_seed_unless_given() -> None:
    a = run("dare_linear", TAU, run_seed=11)
    assert torch.equal(a, run("dare_linear", TAU, run_seed=11))
    assert not torch.equal(a, run("dare_linear", TAU, run_seed=12))
    assert torch.equal(run("dare_linear", TAU, run_seed=99, seed=11), a)  # explicit seed wins
    assert not torch.equal(a, run("dare_linear", TAU, run_seed=11, name="pooler.dense.weight"))


# ------------------------------------------------------------------------ docs/algorithms.md §4


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("ties", {"density": 1.0}),
        ("ties", {"density": 1.0, "scope": "per_tensor"}),
        ("dare_linear", {"density": 1.0, "scaling": 1.0}),
        ("dare_ties", {"density": 1.0}),
        ("breadcrumbs", {"density": 1.0, "scaling": 1.0}),
        ("breadcrumbs_ties", {"density": 1.0, "gamma": 0.0}),
    ],
)
def test_one_expert_no_sparsification_lambda_one_returns_it(method: str, raw: dict) -> None:
    tensors = {"a": torch.randn(1, 6, 5), "b": torch.randn(1, 7)}
    out = merge_model(method, tensors, **raw)
    for name, t in tensors.items():
        assert torch.allclose(out[name], t[0]), name


@pytest.mark.parametrize("method", FAMILY)
def test_lambda_zero_returns_theta_0(method: str) -> None:
    out = merge_model(method, {"a": torch.randn(3, 4, 5)}, scaling=0.0)
    assert torch.equal(out["a"], torch.zeros(4, 5))


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_density_one_agreeing_signs_is_mean_times_lambda(scope: str) -> None:
    tau = torch.rand(4, 8, 3) + 0.01
    tau[:, 0] *= -1  # agreeing negative rows too
    out = run("ties", tau, density=1.0, scaling=1.7, scope="per_tensor")
    assert torch.allclose(out, 1.7 * tau.mean(0))
    glob = merge_model("ties", {"x": tau}, density=1.0, scaling=1.7, scope=scope)["x"]
    assert torch.allclose(glob, 1.7 * tau.mean(0))


# ------------------------------------------------------------ global scope = flattened model


def fake_model(seed: int, n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = {
        "emb": torch.randn(n, 11, 4, generator=g),
        "q.weight": torch.randn(n, 6, 6, generator=g),
        "q.bias": torch.randn(n, 6, generator=g),
        "ln.weight": torch.zeros(n, 5),  # an untouched tensor
        "out.weight": torch.randn(n, 3, 6, generator=g),
    }
    # exact magnitude ties spread across tensors
    model["q.bias"][:, :3] = 0.75
    model["out.weight"][:, 0, :] = -0.75
    return model


def flat(model: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in model.values()], 1)


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("ties", {}),
        ("ties", {"density": 0.37, "consensus": "sum"}),
        ("breadcrumbs", {"scope": "global", "density": 0.3, "gamma": 0.05}),
        ("breadcrumbs_ties", {"scope": "global", "density": 0.5, "gamma": 0.1}),
    ],
)
def test_global_scope_equals_per_tensor_on_the_flattened_model(method: str, raw: dict) -> None:
    model = fake_model(0)
    weights = torch.tensor([1.0, 0.5, 2.0])
    merged = merge_model(method, model, weights, **raw)
    per_tensor = {**raw, "scope": "per_tensor"}
    ref = run(method, flat(model), weights, **per_tensor)
    got = torch.cat([merged[k].reshape(-1) for k in model])
    assert torch.equal(got, ref)


def test_global_ties_keeps_exactly_k_per_expert_across_tensors() -> None:
    model = fake_model(1)
    d = flat(model).shape[1]
    spec = METHODS.get("ties")
    params = spec.validate({"density": 0.2})

    def stream():
        for name, t in model.items():
            yield TensorContext(name, Role.LINEAR_WEIGHT), t

    g = spec.prepare(params, stream)
    from guardmerge.methods.fast.selection import TopKCut, topk_mask

    cut = TopKCut.from_globals(g, "trim")
    kept = sum(
        topk_mask(t.reshape(3, -1), cut.threshold, cut.quota_for(n), absolute=True).sum(1) for n, t in model.items()
    )
    assert kept.tolist() == [int(0.2 * d)] * 3


def test_global_zero_sum_uses_the_whole_model_mass() -> None:
    # tensor 'a' cancels exactly; tensor 'b' makes the model's mass positive
    model = {"a": torch.tensor([[1.0], [-1.0]]), "b": torch.tensor([[5.0], [0.0]])}
    out = merge_model("ties", model, density=1.0)
    assert out["a"].tolist() == [1.0]
    per = merge_model("ties", model, density=1.0, scope="per_tensor")
    assert per["a"].tolist() == [1.0]  # own mass is 0 -> +1
    model["b"] = torch.tensor([[-5.0], [0.0]])
    assert merge_model("ties", model, density=1.0)["a"].tolist() == [-1.0]


def test_global_merge_without_prepare_fails_clearly() -> None:
    with pytest.raises(ValueError, match="prepare"):
        run("ties", TAU)


def test_parameter_validation() -> None:
    for bad in ({"density": 0.0}, {"density": 1.5}, {"scope": "layer"}, {"consensus": "max"}):
        with pytest.raises(ConfigError):
            METHODS.get("ties").validate(bad)
    with pytest.raises(ConfigError):
        METHODS.get("breadcrumbs").validate({"gamma": 1.0})
    with pytest.raises(ConfigError, match="Known parameters"):
        METHODS.get("dare_ties").validate({"p": 0.5})
    defaults = METHODS.get("ties").validate({})
    assert (defaults.density, defaults.scaling, defaults.scope) == (0.2, 1.0, "global")
    assert METHODS.get("dare_linear").validate({}).density == 0.5
    assert METHODS.get("breadcrumbs").validate({}).gamma == 0.01


def test_every_parameter_is_documented() -> None:
    for name in FAMILY:
        for pname, _, _, desc in METHODS.get(name).parameter_rows():
            assert desc, f"{name}.{pname} has no description"


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_global_scope_splits_threshold_ties_in_flat_order(method: str) -> None:
    g = torch.Generator().manual_seed(4)
    signs = torch.randint(0, 2, (2, 40), generator=g) * 2.0 - 1.0
    rows = 0.75 * signs  # every magnitude tied...
    rows[:, ::9] *= 2.0  # ...but a few
    model = {"a": rows[:, :13], "b": rows[:, 13:14], "c": rows[:, 14:].reshape(2, 2, 13)}
    raw = {"density": 0.5, "scope": "global"} | ({"gamma": 0.05} if "crumbs" in method else {})
    spec = METHODS.get(method)

    def stream():
        for name, t in model.items():
            yield TensorContext(name, Role.LINEAR_WEIGHT), t

    globals_ = spec.prepare(spec.validate(raw), stream)
    assert any(":" in key for key in globals_)  # per-tensor tie quotas were needed
    merged = merge_model(method, model, **raw)
    ref = run(method, flat(model), **(raw | {"scope": "per_tensor"}))
    assert torch.equal(torch.cat([merged[k].reshape(-1) for k in model]), ref)


@pytest.mark.parametrize(
    ("method", "raw", "passes"),
    [
        ("ties", {}, 3),  # 2 histogram passes + the mass pass
        ("breadcrumbs", {"scope": "global"}, 2),
        ("breadcrumbs_ties", {"scope": "global"}, 3),
        ("ties", {"scope": "per_tensor"}, 0),
    ],
)
def test_prepare_pass_counts(method: str, raw: dict, passes: int) -> None:
    model = {"a": torch.randn(2, 30), "b": torch.randn(2, 5, 4)}
    calls = []

    def stream():
        calls.append(1)
        for name, t in model.items():
            yield TensorContext(name, Role.LINEAR_WEIGHT), t

    spec = METHODS.get(method)
    spec.prepare(spec.validate(raw), stream)
    assert len(calls) == passes


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("ties", {}),
        ("ties", {"scope": "per_tensor", "density": 0.5}),
        ("dare_ties", {"rescale_by": "l1"}),
        ("dare_linear", {}),
        ("breadcrumbs_ties", {"scope": "global", "density": 0.4, "gamma": 0.1}),
    ],
)
def test_results_do_not_depend_on_the_chunking(method: str, raw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import guardmerge.methods.fast.selection as selection

    model = fake_model(5)
    model["q.bias"][:, 3:] = -model["q.bias"][:, 3:]  # more structure, same ties
    whole = merge_model(method, model, torch.tensor([1.0, 0.5, 2.0]), **raw)
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 10)
    monkeypatch.setattr(selection, "_SMALL", 0)
    chunked = merge_model(method, model, torch.tensor([1.0, 0.5, 2.0]), **raw)
    for name in model:
        assert torch.equal(whole[name], chunked[name]), name


def test_per_tensor_zero_sum_patch_applies_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import guardmerge.methods.fast.selection as selection

    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 2)  # one column per chunk (N = 2)
    tau = torch.tensor([[1.0, 0.0, -4.0], [-1.0, 0.0, 0.0]])  # column 0 cancels; mass -4
    out = run("ties", tau, density=1.0, scope="per_tensor")
    assert out.tolist() == [-1.0, 0.0, -4.0]
