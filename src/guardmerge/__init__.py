"""guardmerge: merge fine-tuned transformer classifiers into one multi-head model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from guardmerge.models.multihead import MultiHeadModel


def load(path: str | os.PathLike[str], *, revision: str | None = None, **kwargs: Any) -> MultiHeadModel:
    """Load a merged multi-head model: a folder written by ``guardmerge merge``, or a Hugging Face
    Hub id (``"owner/name"``, pushed with ``guardmerge push``; ``revision``: a branch, tag or
    commit), downloaded once into the Hub cache."""
    from pathlib import Path

    from guardmerge.io.checkpoint import resolve
    from guardmerge.models.multihead import MultiHeadModel

    folder = Path(path).expanduser()
    if revision is not None or not folder.exists():
        folder = resolve(os.fspath(path), revision=revision)
    return MultiHeadModel.from_pretrained(folder, **kwargs)


__all__ = ["__version__", "load"]
