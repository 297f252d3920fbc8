"""Merge methods: pure tensor functions registered by name in :data:`METHODS`.

Importing this package imports every method module, which registers its methods, each with one
``METHODS.register(MethodSpec(...))`` (the sparsify x consensus family in :mod:`.ties` from the
rows of its table). :mod:`.reference` states the per-tensor merges on whole tensors, as the
papers do; :mod:`.fast` holds the chunked and fused paths the registered methods run;
:mod:`.params` the parameter fields several methods share.
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
    "fisher_merging",
    "dare_combos",
    "wudi",
    "layer_solves",
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
