"""guardmerge: merge fine-tuned transformer classifiers into one multi-head model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from guardmerge.models.multihead import MultiHeadModel


def load(path: str, **kwargs: Any) -> MultiHeadModel:
    """Load a merged multi-head model folder written by ``guardmerge merge``."""
    from guardmerge.models.multihead import MultiHeadModel

    return MultiHeadModel.from_pretrained(path, **kwargs)


__all__ = ["__version__", "load"]
