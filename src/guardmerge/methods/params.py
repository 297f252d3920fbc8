"""Parameter fields that several methods share, each defined once.

Every method's parameter class (a :class:`~.registry.MethodParams`) lists its fields in its own
order with its own default; a shared field takes its type, bounds, description and search range
from the one function here that defines it, e.g.::

    class TiesParams(MethodParams):
        density: float = density(0.2, detail=" (largest |tau_i|)", search=(0.05, 1.0))
        scaling: float = scaling(1.0, search=(0.5, 2.5))

Defaults differ per method (task arithmetic's ``scaling`` is 0.3, TIES' 1.0), so each call
names its default. ``detail`` is appended to the shared description; ``description`` replaces it
where a method's parameter means something narrower (PCB's ``density`` keeps balanced scores).
The vocabulary is docs/algorithms.md section 0's: ``density`` is the fraction of entries **kept**,
``scaling`` (lambda) the coefficient on the merged task vector.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from guardmerge.methods.registry import searchable

Scope = Literal["global", "per_tensor"]
"""Where top-k and quantiles rank each expert's entries: over its whole task vector or per tensor."""

Consensus = Literal["mean", "sum"]
"""TIES' disjoint aggregation of the entries that agree with the elected sign."""

RescaleBy = Literal["density", "l1"]
"""How DARE rescales its survivors: ``1 / density`` (the paper) or to keep each expert's L1 norm."""

Search = tuple[float, float]

SCALING = "lambda, the coefficient on the merged task vector"
DENSITY = "fraction of each expert's entries kept, in (0, 1]"
RIDGE = (
    "fallback ridge, used only when the summed Gram is numerically singular: adds ridge * mean(diag) * I before solving"
)
ALPHA = (
    "off-diagonal shrink of each Gram: G~ = alpha*G + (1-alpha)*diag(G); "
    "1 = exact RegMean, 0 = per-input-feature weighted mean (typical 0.1-0.95)"
)
SCOPE = (
    "where entries are ranked: 'global' over each expert's whole flattened task vector "
    "(the paper's choice, needs a streamed prepare pass) or 'per_tensor' (mergekit's choice)"
)
CONSENSUS = (
    "disjoint aggregation of the entries whose sign agrees with the elected sign: "
    "'mean' (TIES paper) or 'sum' (mergekit's normalize: false)"
)


Bound = float | None
Extra = dict[str, Any] | None


def _range(search: Search | None, *, log: bool = False) -> Extra:
    """``json_schema_extra`` declaring the range ``guardmerge search`` explores (``None``: not searched)."""
    return None if search is None else searchable(*search, log=log)


def _field(
    default: Any, description: str, extra: Extra, *, gt: Bound = None, ge: Bound = None, le: Bound = None
) -> Any:
    """A pydantic ``Field`` with its bounds and search range."""
    return Field(default, description=description, json_schema_extra=extra, gt=gt, ge=ge, le=le)


def scaling(default: float, *, detail: str = "", search: Search | None = None, description: str = SCALING) -> Any:
    """``scaling`` (lambda): the merged task vector's coefficient, ``theta_0 + scaling * tau_m``."""
    return _field(default, description + detail, _range(search))


def density(default: float, *, detail: str = "", search: Search | None = None, description: str = DENSITY) -> Any:
    """``density``: the fraction of each expert's entries kept, in (0, 1]."""
    return _field(default, description + detail, _range(search), gt=0, le=1)


def ridge(*, description: str = RIDGE) -> Any:
    """``ridge``: the fallback ridge of a singular solve, ``ridge * mean(diag) * I`` (default 1e-6)."""
    return _field(1e-6, description, None, ge=0.0)


def alpha(*, search: Search | None = None, description: str = ALPHA) -> Any:
    """``alpha``: RegMean's off-diagonal Gram shrink in [0, 1] (default 1, exact RegMean)."""
    return _field(1.0, description, _range(search), ge=0.0, le=1.0)


def rho(default: float, *, description: str, search: Search | None = None) -> Any:
    """``rho``: the pull toward an anchor merge, in units of ``mean(diag(sum_i G_i))``, >= 0."""
    return _field(default, description, _range(search), ge=0.0)


def scope(default: Scope, *, description: str = SCOPE) -> Any:
    """``scope``: ``'global'`` (over each expert's whole task vector) or ``'per_tensor'``."""
    return _field(default, description, None)


def consensus() -> Any:
    """``consensus``: TIES' disjoint ``'mean'`` (default) or ``'sum'``."""
    return _field("mean", CONSENSUS, None)


def lr(default: float, *, detail: str = "", search: Search | None = None) -> Any:
    """``lr``: an Adam learning rate, > 0 (searched on a log scale)."""
    return _field(default, "Adam learning rate" + detail, _range(search, log=True), gt=0.0)


def texts(default: int) -> Any:
    """``texts``: unlabelled texts per task that a layer-wise stage runs through the models (>= 2)."""
    return _field(default, "unlabelled texts per task run through the models", None, ge=2)


def max_length() -> Any:
    """``max_length``: tokens per text (default 128, >= 8)."""
    return _field(128, "tokens per text", None, ge=8)


def batch_size(default: int, *, description: str = "texts per forward pass") -> Any:
    """``batch_size``: texts per forward pass or per step (>= 1)."""
    return _field(default, description, None, ge=1)
