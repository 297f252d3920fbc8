"""Layer-wise merges on the merged model's own activations (docs/algorithms.md 3a).

RegMean computes every layer's Grams on each expert's own activations. Once the layers below
are merged, a layer's inputs drift; the layer-wise methods merge from the embeddings upward and
measure each Linear layer's inputs on the partly merged model (the stage that runs the models is
:mod:`guardmerge.merge.layerwise`; the solves here are pure functions of what it measured):

- ``regmean_pp`` (RegMean++, arXiv 2508.03121): ``weight* = (sum_i w_i weight_i G~_i)(sum_i w_i G~_i)^-1``
  with ``G~_i`` the mean Gram of the **merged** model's inputs on task i's texts (alpha shrink as
  RegMean). Biases get the plain average. In the first layer this is RegMean.
- ``lot`` (cross-target least squares, LOT Merging arXiv 2505.23859, PLeaS arXiv 2407.02447):
  ``min_[W b] sum_i w_i ||[X~_i 1] [W b]^T - Y_i||^2 / n_i`` with ``Y_i`` the expert's own layer
  output on its own inputs, so each layer is pulled back to the expert's outputs and the drift of
  the layers below is corrected; the bias is fitted jointly (a ones column).

Both add ``rho * mean(diag(A)) * ||W - W_anchor||^2`` to the objective (closed form: the pull
adds ``rho_abs I`` to the system and ``rho_abs W_anchor`` to its right-hand side), so a good
data-free *anchor* merge and the data-dependent correction add up; ``rho = 0`` is the plain
method. Everything is solved in float64, never inverted, with RegMean's fallback ridge.

Tensors that are not Linear layers keep the starting merge, which the per-tensor function
gives: embeddings the plain (weighted) average, LayerNorm the plain average (``norms:
average``, RegMean's rule) or the anchor's (``norms: anchor``); Linear weights and biases start
at the anchor merge until the stage solves them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from guardmerge.errors import ConfigError
from guardmerge.methods import params as shared
from guardmerge.methods.registry import (
    METHODS,
    LayerwiseSpec,
    LinearSystem,
    MethodParams,
    MethodSpec,
    Role,
    StreamFactory,
    TensorContext,
)
from guardmerge.methods.regmean import shrink_grams, solve_right, weighted_mean


class LayerwiseParams(MethodParams):
    anchor: str = Field(
        "task_arithmetic",
        description="data-free method whose merge is the starting point and the target of the rho pull "
        "(any registered method that needs no statistics)",
    )
    anchor_parameters: dict[str, Any] = Field(
        default_factory=dict, description="the anchor method's parameters (its defaults where not given)"
    )
    rho: float = shared.rho(
        0.0,
        description="pull toward the anchor: adds rho * mean(diag(sum_i G_i)) * ||W - W_anchor||^2; "
        "0 = the plain method",
        search=(0.0, 3.0),
    )
    alpha: float = shared.alpha(description="off-diagonal shrink of each Gram, as RegMean's alpha", search=(0.5, 1.0))
    ridge: float = shared.ridge(description="fallback ridge * mean(diag) when the system is singular")
    norms: Literal["average", "anchor"] = Field(
        "average", description="LayerNorm weights: the plain average of the experts, or the anchor merge's"
    )
    texts: int = shared.texts(300)
    max_length: int = shared.max_length()
    batch_size: int = shared.batch_size(32)

    @model_validator(mode="after")
    def _check_anchor(self) -> LayerwiseParams:
        self.anchor_params()
        return self

    def anchor_params(self) -> MethodParams:
        """The anchor method's validated parameters."""
        spec = METHODS.get(self.anchor)
        if spec.needs or spec.sparsify is not None or spec.layerwise is not None:
            raise ConfigError(f"anchor '{self.anchor}' must be a data-free method (no statistics, no layer-wise solve)")
        return spec.validate(self.anchor_parameters)


def layerwise_start(
    deltas: torch.Tensor, weights: torch.Tensor, params: LayerwiseParams, ctx: TensorContext
) -> torch.Tensor:
    """``[N, *shape]`` -> ``[*shape]``: the merge the layer-wise stage starts from.

    Embeddings: the weighted average; LayerNorm: the average or the anchor's (``norms``); every
    other tensor: the anchor method's merge.
    """
    if ctx.role == Role.EMBEDDING or (ctx.role == Role.NORM and params.norms == "average"):
        return weighted_mean(deltas, weights, ctx.name)
    return METHODS.get(params.anchor).fn(deltas, weights, params.anchor_params(), ctx)


def anchor_prepare(params: LayerwiseParams, stream: StreamFactory) -> dict[str, torch.Tensor]:
    """The anchor's whole-model pre-pass (TIES' global thresholds...), if it has one."""
    spec = METHODS.get(params.anchor)
    return spec.prepare(params.anchor_params(), stream) if spec.prepare is not None else {}


def pulled_solve(
    a: torch.Tensor, b: torch.Tensor, anchor: torch.Tensor, center: torch.Tensor, rho: float, ridge: float, name: str
) -> torch.Tensor:
    """``X (a + rho_abs I) = b + rho_abs anchor`` with ``rho_abs = rho * mean(diag(a))``, float64.

    Solved for ``X - center`` (``center``: the experts' weighted mean), so where ``a`` is
    singular (input directions no text reached) the fallback ridge leaves the experts' mean
    rather than zero, and one expert is returned exactly. ``a``: ``[k, k]`` symmetric PSD;
    ``b``, ``anchor``, ``center``: ``[out, k]``. Returns ``[out, k]``.
    """
    rhs = b - center @ a
    if rho > 0:
        rho_abs = rho * float(torch.diagonal(a).mean())
        a = a + rho_abs * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        rhs = rhs + rho_abs * (anchor - center)
    return center + solve_right(a, rhs, ridge, name)


def _weighted(t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i t_i`` over the leading axis, float64."""
    w = weights.to(device=t.device, dtype=torch.float64).reshape(-1, *([1] * (t.dim() - 1)))
    return (t.to(torch.float64) * w).sum(dim=0)


def regmean_pp_solve(system: LinearSystem, params: LayerwiseParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RegMean++ for one layer: ``(sum_i w_i W_i G~_i + rho_abs W_a)(sum_i w_i G~_i + rho_abs I)^-1``.

    ``system.gram``: ``[N, in, in]``. Returns ``(weight [out, in], bias [out] | None)``, the bias
    the weighted average of the experts' (RegMean's rule), float64.
    """
    g = shrink_grams(system.gram.to(torch.float64), params.alpha)
    w = system.weights.to(torch.float64)
    a = _weighted(g, w)
    b = _weighted(torch.einsum("noi,nij->noj", system.expert_weight.to(torch.float64), g), w)
    center = _weighted(system.expert_weight, w) / float(w.sum())
    weight = pulled_solve(a, b, system.anchor_weight.to(torch.float64), center, params.rho, params.ridge, system.name)
    bias = None if system.expert_bias is None else _weighted(system.expert_bias, w) / float(w.sum())
    return weight, bias


def lot_solve(system: LinearSystem, params: LayerwiseParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-target least squares for one layer: ``[W b] = (sum_i w_i C_i + rho_abs [W_a b_a])
    (sum_i w_i G~_i + rho_abs I)^-1``.

    ``system.gram``: ``[N, in+1, in+1]`` (ones column last), ``system.cross``: ``[N, out, in+1]``.
    The shrink touches the ``[in, in]`` block only. Returns ``(weight [out, in], bias [out])``.
    """
    if system.cross is None:
        raise ValueError(f"lot on '{system.name}': the stage gave no cross products")
    g = system.gram.to(torch.float64)
    if params.alpha != 1.0:
        shrunk = shrink_grams(g, params.alpha)
        shrunk[:, -1, :] = g[:, -1, :]
        shrunk[:, :, -1] = g[:, :, -1]
        g = shrunk
    w = system.weights.to(torch.float64)
    anchor = _with_bias(system.anchor_weight, system.anchor_bias)
    experts = torch.stack(
        [
            _with_bias(system.expert_weight[i], None if system.expert_bias is None else system.expert_bias[i])
            for i in range(len(w))
        ]
    )
    center = _weighted(experts, w) / float(w.sum())
    b = _weighted(system.cross, w)
    if system.reference is not None:  # cross was measured around the reference layer
        b = b + system.reference.to(torch.float64) @ _weighted(system.gram, w)
    solved = pulled_solve(_weighted(g, w), b, anchor, center, params.rho, params.ridge, system.name)
    return solved[:, :-1], solved[:, -1]


def _with_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[out, in]``, ``[out]`` -> ``[out, in + 1]`` float64 (a zero bias when None)."""
    b = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.to(torch.float64)
    return torch.cat([weight.to(torch.float64), b.unsqueeze(1)], dim=1)


_SUMMARY = (
    "starts from an anchor merge (default task arithmetic), then solves every Linear layer from the embeddings up "
    "on the merged model's own activations"
)

METHODS.register(
    MethodSpec(
        name="regmean_pp",
        fn=layerwise_start,
        params=LayerwiseParams,
        summary=f"RegMean++: RegMean with each layer's Grams measured on the merged model so far; {_SUMMARY}. "
        "Needs: data.",
        needs=frozenset(),
        prepare=anchor_prepare,
        layerwise=LayerwiseSpec(solve=regmean_pp_solve, texts=lambda p: p.texts),
        reference="RegMean++, arXiv 2508.03121",
    )
)
METHODS.register(
    MethodSpec(
        name="lot",
        fn=layerwise_start,
        params=LayerwiseParams,
        summary="Cross-target least squares: each layer fitted from the merged model's inputs to the expert's own "
        f"outputs; {_SUMMARY}. Needs: data.",
        needs=frozenset(),
        prepare=anchor_prepare,
        layerwise=LayerwiseSpec(solve=lot_solve, cross=True, bias=True, texts=lambda p: p.texts),
        reference="LOT Merging, arXiv 2505.23859; PLeaS, arXiv 2407.02447",
    )
)
