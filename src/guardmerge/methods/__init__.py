"""Merge methods: pure tensor functions registered by name in :data:`METHODS`.

Importing this package imports every method module, which registers its methods.
"""

from __future__ import annotations

import importlib

from guardmerge.methods.registry import (
    METHODS,
    BlockProblem,
    LayerwiseSpec,
    LinearSystem,
    MethodParams,
    MethodSpec,
    Role,
    SearchRange,
    StreamFactory,
    TensorContext,
    searchable,
)

# Each module registers its methods when imported. Add new method modules here.
_METHOD_MODULES = (
    "basic",
    "ties",
    "pcb",
    "model_stock",
    "regmean",
    "fisher",
    "dare_combos",
    "wudi",
    "layerwise",
    "prodistill",
)

for _module in _METHOD_MODULES:
    importlib.import_module(f"guardmerge.methods.{_module}")

__all__ = [
    "METHODS",
    "BlockProblem",
    "LayerwiseSpec",
    "LinearSystem",
    "MethodParams",
    "MethodSpec",
    "Role",
    "SearchRange",
    "StreamFactory",
    "TensorContext",
    "searchable",
]
