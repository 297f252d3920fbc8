"""The method registry: every merge method is registered once, by name, with a typed schema.

A method is a **pure function over tensors**::

    fn(deltas, weights, params, ctx) -> merged_delta

- ``deltas``: ``[N, *shape]`` task vectors ``tau_i = theta_i - theta_0`` of one tensor, float32
  (or float64 where a method asks for it), one row per expert, in config order.
- ``weights``: ``[N]`` per-expert coefficients from the config (default 1.0 each).
- ``params``: the method's validated parameter model (a frozen pydantic model).
- ``ctx``: a :class:`TensorContext` with the tensor's name and role, per-expert statistics for
  data-dependent methods, global values computed by the method's ``prepare`` hook, and a
  deterministic per-tensor random generator.
- returns ``[*shape]``: the merged task vector, scaling included; the engine adds ``theta_0``.

Methods that need whole-model quantities (global top-k thresholds for TIES/PCB) declare a
``prepare`` hook. It receives the parameters and a *stream factory*: each call of the factory
returns a fresh iterator over ``(TensorContext, deltas)`` for every tensor in the merge scope,
one tensor at a time, so a hook can make several exact passes without ever holding a whole
model. Its result (a dict of tensors) reaches every later call as ``ctx.globals``.

Every method module registers each of its methods once, with
``METHODS.register(MethodSpec(...))``. The CLI, config validation and docs all read
:data:`METHODS`; there are no if/elif chains over method names anywhere else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from guardmerge.errors import ConfigError
from guardmerge.models.roles import Role


@dataclass(frozen=True)
class SearchRange:
    """The range ``guardmerge search`` explores for one parameter (declared on its Field).

    Attributes:
        low, high: inclusive bounds.
        log: sample on a log scale.
        integer: an integer parameter (e.g. DARE's seed).
    """

    low: float
    high: float
    log: bool = False
    integer: bool = False


def searchable(low: float, high: float, *, log: bool = False, integer: bool = False) -> dict[str, Any]:
    """``json_schema_extra`` for a parameter Field: declares its search range next to it.

    Example: ``density: float = Field(0.2, gt=0, le=1, json_schema_extra=searchable(0.05, 1.0))``.
    """
    if not low < high:
        raise ValueError(f"search range needs low < high, got [{low}, {high}]")
    return {"search": {"low": low, "high": high, "log": log, "integer": integer}}


class MethodParams(BaseModel):
    """Base of every method's parameter schema: typed, frozen, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # NaN/Inf refused for every method


P = TypeVar("P", bound=MethodParams)
P_contra = TypeVar("P_contra", bound=MethodParams, contravariant=True)  # the protocols only take params


def _empty_tensor_map() -> dict[str, torch.Tensor]:
    return {}


@dataclass(frozen=True)
class TensorContext:
    """Everything a method may know about the tensor being merged, besides its values.

    Attributes:
        name: canonical tensor name (architecture prefix removed), e.g.
            ``encoder.layer.0.attention.self.query.weight``.
        role: the tensor's :class:`Role`.
        stats: per-expert statistics for this tensor, each stacked over experts, e.g.
            ``{"gram": [N, in, in]}`` for a Linear weight, ``{"fisher": [N, *shape]}``.
        globals: what the method's ``prepare`` hook returned (e.g. ``{"threshold": [N]}``).
        seed: the run seed (DARE); use :meth:`generator` to get this tensor's generator.
    """

    name: str
    role: Role
    stats: Mapping[str, torch.Tensor] = field(default_factory=_empty_tensor_map)
    globals: Mapping[str, torch.Tensor] = field(default_factory=_empty_tensor_map)
    seed: int = 0

    def generator(self, seed: int | None = None) -> torch.Generator:
        """A CPU generator seeded from ``(seed, name)``: same seed, same draw, in any order."""
        s = self.seed if seed is None else seed
        digest = hashlib.sha256(f"{s}:{self.name}".encode()).digest()
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen


StreamFactory = Callable[[], Iterator[tuple[TensorContext, torch.Tensor]]]


class MergeFn(Protocol[P_contra]):
    def __call__(
        self, deltas: torch.Tensor, weights: torch.Tensor, params: P_contra, ctx: TensorContext
    ) -> torch.Tensor: ...


class SparsifyFn(Protocol[P_contra]):
    def __call__(self, deltas: torch.Tensor, params: P_contra, ctx: TensorContext) -> torch.Tensor: ...


class PrepareFn(Protocol[P_contra]):
    def __call__(self, params: P_contra, stream: StreamFactory) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class LinearSystem:
    """What the layer-wise stage measured for one Linear layer (docs/algorithms.md 3a).

    ``k`` is the layer's input size, plus one when the method fits the bias jointly (a ones
    column appended to every input row).

    Attributes:
        name: canonical name of the layer's weight.
        gram: ``[N, k, k]`` per task, the mean over its tokens of ``x~ x~^T``, ``x~`` the input
            the *merged* model so far gives the layer (float64).
        cross: ``[N, out, k]`` per task, the mean of ``(y - reference x~) x~^T`` with ``y`` the
            expert's own layer output on the expert's own input (only for methods that ask for
            it); ``cross + reference @ gram`` is the plain mean of ``y x~^T``.
        expert_weight: ``[N, out, in]`` the experts' weights of the layer.
        expert_bias: ``[N, out]`` their biases (None for a layer without bias).
        anchor_weight: ``[out, in]`` the layer in the anchor merge (the pull target).
        anchor_bias: ``[out]`` or None.
        weights: ``[N]`` per-expert coefficients.
        reference: ``[out, k]`` the layer :attr:`cross` is measured around (the stage uses the
            experts' mean, so that residuals, not raw outputs, meet float32 rounding); None: 0.
    """

    name: str
    gram: torch.Tensor
    cross: torch.Tensor | None
    expert_weight: torch.Tensor
    expert_bias: torch.Tensor | None
    anchor_weight: torch.Tensor
    anchor_bias: torch.Tensor | None
    weights: torch.Tensor
    reference: torch.Tensor | None = None


class LayerSolveFn(Protocol[P_contra]):
    def __call__(self, system: LinearSystem, params: P_contra) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass(frozen=True)
class BlockProblem:
    """What the layer-wise stage gives a per-block fit (docs/algorithms.md 3a, ProDistill).

    Attributes:
        name: the block's canonical prefix, e.g. ``encoder.layer.3``.
        base: parameter name (within the block) -> ``theta_0`` of that parameter.
        deltas: parameter name -> ``[N, *shape]`` the experts' task vectors.
        forward: ``(parameters, task, batch) -> [n, d]``: the block called with ``parameters``
            on the **merged** model's inputs of task ``task``'s batch ``batch`` (non-padding
            rows), differentiable in ``parameters``.
        targets: ``[task][batch] -> [n, d]`` the expert's own block output on the expert's own
            inputs (no gradient).
        weights: ``[N]`` per-expert coefficients.
    """

    name: str
    base: Mapping[str, torch.Tensor]
    deltas: Mapping[str, torch.Tensor]
    forward: Callable[[Mapping[str, torch.Tensor], int, int], torch.Tensor]
    targets: Sequence[Sequence[torch.Tensor]]
    weights: torch.Tensor


class BlockFitFn(Protocol[P_contra]):
    def __call__(self, problem: BlockProblem, params: P_contra) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class LayerwiseSpec(Generic[P]):
    """How a layer-wise method solves each Linear layer (``solve``) or each whole block
    (``fit``) on the merged model's activations; exactly one of the two is given.

    Attributes:
        solve: the pure solve, ``(LinearSystem, params) -> (weight [out, in], bias [out] | None)``
            (bias None: keep the merge's bias).
        cross: the solve needs :attr:`LinearSystem.cross` (expert outputs on expert inputs).
        bias: the bias is fitted jointly (the Gram carries the ones column).
        fit: a per-block fit, ``(BlockProblem, params) -> {parameter: tensor}`` (the block's new
            parameters); the stage then needs the base model's tensors.
        texts: how many unlabelled texts per task the stage reads, from the parameters (the
            declaration the job reads to load the texts; None: every text given).
    """

    solve: LayerSolveFn[P] | None = None
    cross: bool = False
    bias: bool = False
    fit: BlockFitFn[P] | None = None
    texts: Callable[[P], int | None] | None = None

    def text_count(self, params: P) -> int | None:
        """Texts per task the stage reads under ``params`` (None: all)."""
        return None if self.texts is None else self.texts(params)

    def __post_init__(self) -> None:
        if (self.solve is None) == (self.fit is None):
            raise ValueError("a LayerwiseSpec takes exactly one of solve (per Linear layer) or fit (per block)")


@dataclass(frozen=True)
class MethodSpec(Generic[P]):
    """A registered method.

    Attributes:
        name: the name used in configs and on the command line.
        fn: the pure tensor function (see module docstring).
        params: the pydantic parameter schema.
        summary: one line for ``guardmerge methods`` and the docs.
        needs: statistics the method requires per expert (``{"gram"}``, ``{"fisher"}``; an empty
            set for a data-free method): always given, never inferred.
        prepare: optional whole-model pre-pass (global thresholds).
        sparsify: optional drop applied to every expert's task vectors before anything else
            (DARE for ``dare_regmean``): the engine merges the sparsified experts and the
            pipeline computes statistics on them, as docs/algorithms.md section 2 requires.
        layerwise: for methods solved layer by layer on the merged model's own activations
            (``lot``, ``regmean_pp``): ``fn`` gives the starting merge, then the layer-wise
            stage solves every Linear layer with :attr:`LayerwiseSpec.solve`.
        reference: the paper or source the method follows.
    """

    name: str
    fn: MergeFn[P]
    params: type[P]
    summary: str
    needs: frozenset[str]
    prepare: PrepareFn[P] | None = None
    sparsify: SparsifyFn[P] | None = None
    layerwise: LayerwiseSpec[P] | None = None
    reference: str = ""

    def validate(self, raw: Mapping[str, Any] | None) -> P:
        """Validate raw parameters into the schema, or raise :class:`ConfigError`."""
        try:
            return self.params.model_validate(dict(raw or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(parameters)'}: {err['msg']}" for err in exc.errors()
            )
            known = ", ".join(self.params.model_fields) or "(none)"
            raise ConfigError(
                f"invalid parameters for method '{self.name}': {problems}. Known parameters: {known}"
            ) from None

    def search_space(self) -> dict[str, SearchRange]:
        """Parameter name -> :class:`SearchRange`, for every parameter that declares one."""
        space = {}
        for pname, finfo in self.params.model_fields.items():
            extra = finfo.json_schema_extra
            if isinstance(extra, dict) and isinstance(extra.get("search"), dict):
                space[pname] = SearchRange(**extra["search"])  # type: ignore[arg-type]
        return space

    def parameter_rows(self) -> list[tuple[str, str, str, str]]:
        """``(name, type, default, description)`` for each parameter, for docs and the CLI."""
        space = self.search_space()
        rows = []
        for pname, finfo in self.params.model_fields.items():
            tname = _type_name(finfo.annotation)
            default = "required" if finfo.is_required() else repr(finfo.get_default(call_default_factory=True))
            desc = finfo.description or ""
            r = space.get(pname)
            if r is not None:
                desc += f" (search: {r.low}..{r.high})"
            rows.append((pname, tname, default, desc))
        return rows


def _type_name(annotation: Any) -> str:
    """``float``, ``int | None``, ``'global' | 'per_tensor'`` for a parameter annotation."""
    if get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    name = getattr(annotation, "__name__", None)
    if name and not get_args(annotation):
        return name
    return str(annotation).replace("typing.", "")


class Registry:
    """Name -> :class:`MethodSpec`. Registering a name twice is an error."""

    def __init__(self) -> None:
        self._specs: dict[str, MethodSpec[Any]] = {}

    def register(self, spec: MethodSpec[Any]) -> MethodSpec[Any]:
        """Add ``spec`` under its name: the one way a method is registered (every field of the
        spec, ``needs`` included, given where the method is defined)."""
        if spec.name in self._specs:
            raise ValueError(f"method '{spec.name}' is registered twice")
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> MethodSpec[Any]:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs))
            raise ConfigError(f"unknown method '{name}'. Known methods: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[MethodSpec[Any]]:
        return iter(self._specs[n] for n in self.names())


METHODS = Registry()
"""The registry every method module registers into at import (see ``guardmerge.methods``)."""
