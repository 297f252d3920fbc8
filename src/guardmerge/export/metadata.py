"""An ONNX export folder's metadata (``guardmerge_onnx.json``), read without torch, so an ONNX
runtime process (``serve --backend onnx``, the LLM Guard scanners) never imports it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from guardmerge.errors import GuardmergeError

ONNX_FILE = "model.onnx"
META_FILE = "guardmerge_onnx.json"

__all__ = ["META_FILE", "ONNX_FILE", "is_onnx_folder", "read_metadata"]


def is_onnx_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder written by :func:`export_onnx`."""
    return (Path(path) / META_FILE).is_file()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read and check ``guardmerge_onnx.json`` of an exported folder."""
    folder = Path(path)
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise GuardmergeError(f"{meta_file} is missing: not a folder written by 'guardmerge export-onnx'")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise GuardmergeError(f"{meta_file} is not valid JSON: {exc}") from None
    missing = [k for k in ("model_file", "inputs", "tasks", "heads") if k not in meta]
    if missing:
        raise GuardmergeError(f"{meta_file} lacks {', '.join(missing)}")
    if not (folder / meta["model_file"]).is_file():
        raise GuardmergeError(f"{folder / meta['model_file']} is missing")
    return meta
