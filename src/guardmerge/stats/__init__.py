"""Per-expert statistics for data-dependent merging: RegMean Grams and diagonal Fisher.

- :func:`collect_grams` (:mod:`guardmerge.stats.gram`): mean ``x x^T`` of every Linear input.
- :func:`collect_fisher` (:mod:`guardmerge.stats.fisher`): mean per-example squared gradients.
- :func:`save_stats` / :func:`load_stats` / :func:`expert_fingerprint` (:mod:`guardmerge.stats.files`):
  statistics files tied to the expert they were computed on.
- :func:`tokenize_batches` (:mod:`guardmerge.stats.batches`): texts -> tokenised batches.
"""

from __future__ import annotations

from guardmerge.stats.batches import tokenize_batches
from guardmerge.stats.files import (
    ExpertStats,
    StackedStats,
    check_fingerprint,
    derive_fingerprint,
    expert_fingerprint,
    load_stats,
    read_stats_metadata,
    save_stats,
    stack_for_tensor,
)
from guardmerge.stats.fisher import FisherStats, collect_fisher
from guardmerge.stats.gram import GramStats, collect_grams

__all__ = [
    "ExpertStats",
    "FisherStats",
    "GramStats",
    "StackedStats",
    "check_fingerprint",
    "collect_fisher",
    "collect_grams",
    "derive_fingerprint",
    "expert_fingerprint",
    "load_stats",
    "read_stats_metadata",
    "save_stats",
    "stack_for_tensor",
    "tokenize_batches",
]
