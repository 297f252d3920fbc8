"""An ONNX export folder's metadata (``guardmerge_onnx.json``), read without torch, so an ONNX
runtime process (``serve --backend onnx``, the LLM Guard scanners) never imports it.

The file is not trusted: :func:`read_metadata` checks all of it (:class:`OnnxMetadata`) before
anything is opened. ``model_file`` must be a plain file name inside the folder (no separators,
no ``..``, no link leading out); every head needs a non-empty list of string labels, an
``output`` name and a ``problem`` (``single_label``, ``multi_label`` or ``token``); thresholds
are label -> number in [0, 1]; ``benign`` lists labels of the head; ``weights_sha256`` (plain
file name -> SHA-256 hex, the model file among them) names the graph files whose weights the
export checked for NaN/Inf (:mod:`guardmerge.export.weights`). A file that is not UTF-8
JSON, or any field of the wrong type, is a one-line :class:`~guardmerge.errors.GuardmergeError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from guardmerge.errors import GuardmergeError
from guardmerge.io.formats import read_json
from guardmerge.models.head_kinds import HEAD_KINDS, KindName

ONNX_FILE = "model.onnx"
META_FILE = "guardmerge_onnx.json"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_META_BYTES = 16 << 20
"""A metadata file larger than this is refused before it is parsed."""

__all__ = ["META_FILE", "ONNX_FILE", "HeadMetadata", "OnnxMetadata", "is_onnx_folder", "read_metadata"]


class HeadMetadata(BaseModel):
    """One head's entry in ``guardmerge_onnx.json``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    labels: list[str] = Field(..., min_length=1)
    output: str = Field(..., min_length=1)
    problem: KindName
    activation: str | None = None
    thresholds: dict[str, float] | None = None
    benign: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> HeadMetadata:
        if any(not label for label in self.labels):
            raise ValueError("labels must be non-empty strings")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        expected = HEAD_KINDS[self.problem].onnx_activation
        if self.activation is not None and self.activation != expected:
            raise ValueError(
                f"activation '{self.activation}' does not fit problem '{self.problem}' (expected '{expected}')"
            )
        for label, value in (self.thresholds or {}).items():
            if label not in self.labels:
                raise ValueError(f"threshold for unknown label '{label}'")
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"threshold of '{label}' is {value}, not a number in [0, 1]")
        unknown = sorted(set(self.benign or ()) - set(self.labels))
        if unknown:
            raise ValueError(f"benign names unknown label(s) {', '.join(unknown)}")
        return self


class OnnxMetadata(BaseModel):
    """``guardmerge_onnx.json``: the checked fields (unknown top-level fields are kept as given)."""

    model_config = ConfigDict(strict=True, extra="allow")

    model_file: str = Field(..., min_length=1, max_length=255)
    inputs: list[Literal["input_ids", "attention_mask", "token_type_ids"]] = Field(..., min_length=1)
    tasks: list[str] = Field(..., min_length=1)
    heads: dict[str, HeadMetadata]
    format: int | None = None
    precision: str = Field("fp32", min_length=1)
    opset: int | None = None
    max_length: int = Field(512, ge=1, le=1_000_000)
    model_type: str | None = None
    info: dict[str, Any] = Field(default_factory=dict)
    guardmerge_version: str | None = None
    weights_sha256: dict[str, str] | None = None

    @field_validator("model_file")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or "\x00" in value or value in (".", "..") or value.strip() != value:
            raise ValueError(f"'{value}' is not a plain file name inside the folder (no separators, no '..')")
        return value

    @field_validator("weights_sha256")
    @classmethod
    def _digests(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name, digest in (value or {}).items():
            cls._plain_name(name)
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"the digest of '{name}' is not a SHA-256 hex string")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> OnnxMetadata:
        if "input_ids" not in self.inputs or len(set(self.inputs)) != len(self.inputs):
            raise ValueError("inputs must hold input_ids, each input once")
        if any(not t for t in self.tasks) or len(set(self.tasks)) != len(self.tasks):
            raise ValueError("tasks must be unique non-empty strings")
        if self.weights_sha256 is not None and self.model_file not in self.weights_sha256:
            raise ValueError(f"weights_sha256 lacks the model file '{self.model_file}'")
        if set(self.tasks) != set(self.heads):
            raise ValueError(f"tasks ({', '.join(self.tasks)}) and heads ({', '.join(self.heads)}) differ")
        outputs = [h.output for h in self.heads.values()]
        if len(set(outputs)) != len(outputs):
            raise ValueError("two heads name the same output")
        return self


def is_onnx_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder written by :func:`export_onnx`."""
    return (Path(path) / META_FILE).is_file()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "the file"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    return f"{where}: {msg}{more}"


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read and check ``guardmerge_onnx.json`` of an exported folder (see the module docstring);
    the checked content as a dict, defaults filled in."""
    folder = Path(path)
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise GuardmergeError(f"{meta_file} is missing: not a folder written by 'guardmerge export-onnx'")
    data = read_json(meta_file, what="guardmerge metadata JSON", max_bytes=MAX_META_BYTES)
    if not isinstance(data, dict):
        raise GuardmergeError(f"{meta_file} must hold a JSON object, not {type(data).__name__}")
    try:
        meta = OnnxMetadata.model_validate(data)
    except ValidationError as exc:
        raise GuardmergeError(f"{meta_file}: {_first_error(exc)}") from None
    model = folder / meta.model_file
    try:
        inside = model.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise GuardmergeError(f"{meta_file}: model_file '{meta.model_file}' leads outside the folder")
    if not model.is_file():
        raise GuardmergeError(f"{model} is missing (model_file of {meta_file})")
    out = meta.model_dump(exclude_none=False)
    out["heads"] = {t: h.model_dump(exclude_none=True) for t, h in meta.heads.items()}
    return out
