"""The evaluation layer: models and data in, ``{task: {metric: value}}`` out.

- :mod:`~guardmerge.evaluate.metrics`: task metrics of a model on labelled data (:func:`evaluate`).
- :mod:`~guardmerge.evaluate.fidelity`: how closely each merged head answers like its expert, on
  unlabelled texts (``fidelity.fidelity``; ``guardmerge eval MERGED --experts``).
- :mod:`~guardmerge.evaluate.bootstrap`: percentile bootstrap intervals over resampled texts.

Everything the former ``guardmerge.evaluate`` module held is importable from here.
"""

from guardmerge.evaluate.metrics import (
    OFFICIAL_METRIC,
    SCORERS,
    Results,
    Scorer,
    classification_metrics,
    evaluate,
    labelled_report,
    mean,
    multi_label_metrics,
    normalized,
    table,
    to_json_ready,
    token_metrics,
)

__all__ = [
    "OFFICIAL_METRIC",
    "SCORERS",
    "Results",
    "Scorer",
    "classification_metrics",
    "evaluate",
    "labelled_report",
    "mean",
    "multi_label_metrics",
    "normalized",
    "table",
    "to_json_ready",
    "token_metrics",
]
