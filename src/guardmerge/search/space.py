"""What a search trial may change: method parameters (from the registry) and per-expert weights.

The ranges come from the method's parameter schema (``searchable(...)`` on each Field, see
:mod:`guardmerge.methods.registry`), so the space is declared once, next to the parameter it
tunes. Per-expert weights (PCB + ES's ``lambda_i``, docs/algorithms.md section 2) are searched when
asked, in ``weight_range``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from guardmerge.errors import ConfigError
from guardmerge.methods import METHODS, SearchRange

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class Candidate:
    """One point of the search: method parameters and per-expert weights (config order)."""

    parameters: dict[str, Any]
    weights: tuple[float, ...]

    def key(self) -> str:
        """A stable identity (identical candidates reuse their score)."""
        params = ",".join(f"{k}={self.parameters[k]!r}" for k in sorted(self.parameters))
        return f"{params}|{','.join(repr(w) for w in self.weights)}"


class Space(Protocol):
    """What a study searches (:class:`SearchSpace`, or ``guardmerge plan``'s
    :class:`~guardmerge.search.plan.PlanSpace`)."""

    @property
    def tasks(self) -> tuple[str, ...]: ...

    @property
    def dimensions(self) -> int: ...

    def suggest(self, trial: optuna.Trial) -> Candidate: ...

    def from_values(self, values: Mapping[str, Any]) -> Candidate: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of a search.

    Attributes:
        method: registered method name.
        ranges: parameter -> range searched.
        fixed: parameters held at the config's value.
        tasks: expert task names, config order.
        base_weights: the config's per-expert weights (used when weights are not searched).
        weight_range: ``(low, high)`` per-expert weight bounds, or None to keep the config's.
    """

    method: str
    ranges: dict[str, SearchRange]
    fixed: dict[str, Any]
    tasks: tuple[str, ...]
    base_weights: tuple[float, ...]
    weight_range: tuple[float, float] | None = None

    @property
    def dimensions(self) -> int:
        return len(self.ranges) + (len(self.tasks) if self.weight_range else 0)

    def suggest(self, trial: optuna.Trial) -> Candidate:
        """Draw a candidate through ``trial`` (its sampler decides where)."""
        params = dict(self.fixed)
        for name, r in self.ranges.items():
            if r.integer:
                params[name] = trial.suggest_int(name, int(r.low), int(r.high), log=r.log)
            else:
                params[name] = trial.suggest_float(name, r.low, r.high, log=r.log)
        if self.weight_range:
            lo, hi = self.weight_range
            weights = tuple(trial.suggest_float(f"weight.{t}", lo, hi) for t in self.tasks)
        else:
            weights = self.base_weights
        return Candidate(params, weights)

    def from_values(self, values: Mapping[str, Any]) -> Candidate:
        """The candidate a finished trial's ``params`` describe."""
        params = dict(self.fixed)
        params.update({k: values[k] for k in self.ranges})
        weights = tuple(float(values[f"weight.{t}"]) for t in self.tasks) if self.weight_range else self.base_weights
        return Candidate(params, weights)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (stored with the study and in the output's summary)."""
        return {
            "method": self.method,
            "ranges": {
                k: [r.low, r.high] + (["log"] if r.log else []) + (["int"] if r.integer else [])
                for k, r in self.ranges.items()
            },
            "fixed": self.fixed,
            "weights": list(self.weight_range) if self.weight_range else "fixed",
        }


def build_space(
    method: str,
    parameters: Mapping[str, Any],
    tasks: Sequence[str],
    base_weights: Sequence[float],
    *,
    only: Sequence[str] | None = None,
    weight_range: tuple[float, float] | None = None,
) -> SearchSpace:
    """The search space of ``method``: its declared ranges (or the subset ``only``; empty =
    none), the config's other parameters fixed, and optionally per-expert weights.

    Raises:
        ConfigError: unknown parameter in ``only``, a parameter without a declared range, or
            nothing at all to search.
    """
    spec = METHODS.get(method)
    declared = spec.search_space()
    names = list(declared) if only is None else list(only)
    for name in names:
        if name not in spec.params.model_fields:
            raise ConfigError(
                f"method '{method}' has no parameter '{name}'; its parameters: "
                f"{', '.join(spec.params.model_fields) or '(none)'}"
            )
        if name not in declared:
            raise ConfigError(
                f"parameter '{name}' of method '{method}' declares no search range; searchable: "
                f"{', '.join(declared) or '(none)'}"
            )
    if weight_range is not None and not 0 <= weight_range[0] < weight_range[1]:
        raise ConfigError(f"weight range must satisfy 0 <= low < high, got {list(weight_range)}")
    ranges = {n: declared[n] for n in names}
    if not ranges and weight_range is None:
        raise ConfigError(
            f"nothing to search for method '{method}': it declares no searchable parameter; "
            "search the per-expert weights (--weights) or choose another method"
        )
    fixed = {k: v for k, v in parameters.items() if k not in ranges}
    spec.validate(fixed)  # the fixed part must already be valid on its own
    return SearchSpace(method, ranges, fixed, tuple(tasks), tuple(float(w) for w in base_weights), weight_range)
