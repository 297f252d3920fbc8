"""Merge search: tune a method's parameters and per-expert weights on validation data.

- :mod:`~guardmerge.search.space`: the search space, read from the method registry.
- :mod:`~guardmerge.search.objective`: scoring a candidate (merge, validation macro-F1).
- :mod:`~guardmerge.search.study`: the Optuna study, storage, workers, Ray backend.
- :mod:`~guardmerge.search.output`: the best merge written with its summary and history plot.

Needs ``pip install 'guardmerge[search]'`` (Optuna, cmaes, matplotlib); the Ray backend
``guardmerge[ray]``.
"""

from guardmerge.search.objective import MergeScorer, SearchJob, aggregate
from guardmerge.search.space import Candidate, SearchSpace, build_space
from guardmerge.search.study import SearchOutcome, SearchSettings, run_search

__all__ = [
    "Candidate",
    "MergeScorer",
    "SearchJob",
    "SearchOutcome",
    "SearchSettings",
    "SearchSpace",
    "aggregate",
    "build_space",
    "run_search",
]
