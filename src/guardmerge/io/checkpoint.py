"""The one checked reader of model folders: a local folder or a hub id, same code path.

:class:`CheckpointFiles` opens a folder's weights (single file or shards, found by
:func:`~guardmerge.io.formats.weight_files`) and reads tensors one at a time under the names they
are stored with. Everything that opens weights goes through it (the canonical view of
:class:`guardmerge.models.checkpoint.Checkpoint`, ``load()``, statistics, fine-tuning, export), so
each rule holds everywhere:

- the folder rules of :mod:`guardmerge.io.formats` (shards and links inside the folder, no
  pickles unless allowed, a checked ``config.json``);
- the header rules of :mod:`guardmerge.io.safetensors` (offsets tile the file exactly);
- every tensor is floating point (fp8 counts as quantised), except the integer buffers a
  transformers checkpoint may carry (``position_ids``, ``token_type_ids``); quantised tensor
  names (GPTQ/AWQ, bitsandbytes) are refused;
- a tensor read with NaN or Inf values is refused, naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from guardmerge.errors import CheckpointError
from guardmerge.io.finite import finite_abs_max
from guardmerge.io.formats import clip, read_config, short_path, weight_files
from guardmerge.io.safetensors import SafetensorsFile

log = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "merges.txt"]
"""What a hub download fetches: configs, safetensors weights and tokenizer files (never pickles or code)."""

QUANTIZED_SUFFIXES = (
    ".qweight",
    ".qzeros",
    ".scales",
    ".g_idx",
    ".SCB",
    ".weight_format",
    ".absmax",
    ".quant_map",
    ".quant_state",
    ".nested_absmax",
    ".nested_quant_map",
)
"""Tensor-name endings of quantised checkpoints (GPTQ/AWQ, bitsandbytes int8 and 4-bit)."""

INTEGER_BUFFERS = ("position_ids", "token_type_ids")
"""The integer tensors a transformers checkpoint may carry (embedding index buffers)."""

FP8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_problem(key: str, dtype: torch.dtype) -> str | None:
    """Why tensor ``key`` of ``dtype`` cannot be read as model weights, or None."""
    if key.endswith(QUANTIZED_SUFFIXES):
        return "belongs to a quantised checkpoint (GPTQ/AWQ/bitsandbytes)"
    if dtype in FP8_DTYPES:
        return f"is {dtype_name(dtype)}, a quantised format"
    if dtype.is_floating_point:
        return None
    if key.endswith(INTEGER_BUFFERS) and dtype in (torch.int64, torch.int32):
        return None
    if dtype in (torch.int8, torch.uint8):
        return f"is {dtype_name(dtype)}, a quantised checkpoint"
    return f"is {dtype_name(dtype)}; weights must be floating point"


def resolve(source: str | Path, *, revision: str | None = None) -> Path:
    """A local folder for ``source``: the folder itself, or a hub snapshot downloaded for it.

    Raises:
        CheckpointError: neither a local folder nor a reachable hub repository.
    """
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            return path.resolve()
        exists = path.exists()
    except OSError as exc:
        raise CheckpointError(f"model folder '{short_path(source)}': {exc.strerror}") from None
    if exists:
        raise CheckpointError(f"'{short_path(source)}' is a file; expected a model folder or a hub id")
    text = str(source)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local:
        raise CheckpointError(f"model folder '{short_path(source)}' not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # the hub raises many types: offline, 404, auth
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"'{short_path(source)}' is not a local folder and could not be fetched from the Hugging Face "
            f"Hub (not found, or offline: {clip(reason, 200)}). Pass a local model folder, or run once "
            "online to cache it."
        ) from None


class CheckpointFiles:
    """A model folder opened for checked, tensor-by-tensor reading under its stored names.

    Args:
        folder: the local folder (see :func:`resolve` for hub ids).
        allow_pickle: accept ``pytorch_model.bin`` weights (loaded with ``weights_only``).
        where: how errors name this checkpoint (default: the folder).
        config: the folder's config when the caller has read it already.

    Attributes:
        path: the folder; config: its ``config.json``; pickled: whether its weights are pickles.
        abs_max: the largest ``|value|`` of the float tensors read so far (free with the
            NaN/Inf check; the writer probes a merged model whose weights leave this range).
    """

    def __init__(
        self, folder: str | Path, *, allow_pickle: bool = False, where: str | None = None, config: Any = None
    ) -> None:
        self.path = Path(folder)
        self.where = where or short_path(self.path)
        self.config: dict[str, Any] = config if config is not None else read_config(self.path, where=where)
        self._stack = ExitStack()
        self._files: dict[Path, SafetensorsFile] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._index: dict[str, Path] = {}  # stored key -> its file
        self.abs_max = 0.0
        try:
            files, self.pickled = weight_files(self.path, allow_pickle=allow_pickle)
            if self.pickled:
                self._load_pickles(files)
            else:
                for f in files:
                    handle = SafetensorsFile(f)
                    self._stack.callback(handle.close)
                    self._files[f] = handle
                    for key in handle.keys():  # noqa: SIM118 (not a dict)
                        self._add(key, f)
            for key in self._index:
                problem = dtype_problem(key, self.dtype(key))
                if problem:
                    raise CheckpointError(f"{self.where}: tensor '{clip(key)}' in {self._index[key].name} {problem}")
        except BaseException:
            self.close()
            raise

    def _load_pickles(self, files: list[Path]) -> None:
        self._pickled = {}
        for f in files:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"cannot read {short_path(f)}: {clip(exc, 200)}") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{short_path(f)} does not hold a state dict")
            for key, value in state.items():
                if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{short_path(f)}: entry '{clip(key)}' is not a named tensor")
                self._pickled[key] = value
                self._add(key, f)

    def _add(self, key: str, file: Path) -> None:
        if key in self._index:
            raise CheckpointError(f"{short_path(file)}: tensor '{clip(key)}' is stored twice")
        self._index[key] = file

    # -- access ----------------------------------------------------------------------------
    def stored_names(self) -> list[str]:
        """Every stored tensor name, in file order."""
        return list(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def file_of(self, key: str) -> Path:
        try:
            return self._index[key]
        except KeyError:
            raise CheckpointError(f"{self.where}: no tensor '{clip(key)}'") from None

    def shape(self, key: str) -> tuple[int, ...]:
        file = self.file_of(key)
        if self._pickled is not None:
            return tuple(self._pickled[key].shape)
        return self._files[file].entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        file = self.file_of(key)
        if self._pickled is not None:
            return self._pickled[key].dtype
        return self._files[file].entries[key][0]

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor into a fresh tensor, optionally cast (see :meth:`read_into`)."""
        return self.read_into(key, torch.empty(self.shape(key), dtype=dtype or self.dtype(key)))

    def read_into(
        self,
        key: str,
        out: torch.Tensor,
        scratch: Callable[[torch.dtype], torch.Tensor] | None = None,
        name: str | None = None,
    ) -> torch.Tensor:
        """Read one tensor into ``out`` (contiguous, same element count), casting to ``out.dtype``;
        refuse NaN or Inf (naming the tensor ``name``, default ``key``).

        Stored in ``out``'s dtype, the bytes go straight from the file into ``out``; otherwise
        they are read into ``scratch(stored_dtype)`` (a reusable buffer of the tensor's size; a
        fresh one when None) and cast. Returns ``out`` with the stored shape.
        """
        file = self.file_of(key)
        shape, stored = self.shape(key), self.dtype(key)
        label = clip(name or key)
        if out.dtype.is_floating_point and not stored.is_floating_point:
            raise CheckpointError(
                f"{self.where}: tensor '{label}' is {dtype_name(stored)}, where a floating-point tensor is expected"
            )
        try:
            if self._pickled is not None:
                result = out.view(shape).copy_(self._pickled[key])
            else:
                handle = self._files[file]
                if stored == out.dtype:
                    result = handle.read_into(key, out)
                else:
                    raw = scratch(stored) if scratch is not None else torch.empty(shape, dtype=stored)
                    result = out.view(shape).copy_(handle.read_into(key, raw))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{short_path(file)}: cannot read tensor '{label}': {clip(exc, 200)}") from None
        largest = finite_abs_max(result)
        if largest is None:
            raise CheckpointError(f"{self.where}: tensor '{label}' holds NaN or Inf values; refused")
        self.abs_max = max(self.abs_max, largest)
        return result

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, checked, under its stored name."""
        return {k: self.get(k) for k in self._index}

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._index:
            yield key, self.get(key)

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_layout(folder: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor's dtype and shape from the safetensors headers alone (no tensor data read;
    no ``config.json`` needed)."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for f in weight_files(Path(folder))[0]:
        with SafetensorsFile(f) as handle:
            for key, (dtype, shape, _, _) in handle.entries.items():
                if key in out:
                    raise CheckpointError(f"{short_path(f)}: tensor '{clip(key)}' is stored twice")
                out[key] = (dtype, shape)
    return out


def read_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors weights (one file or an index), headers checked,
    as stored (no ``config.json`` needed; no dtype or finiteness rule: see :class:`CheckpointFiles`)."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(folder))[0]:
        with SafetensorsFile(f) as handle:
            for key in handle.keys():  # noqa: SIM118 (not a dict)
                if key in out:
                    raise CheckpointError(f"{short_path(f)}: tensor '{clip(key)}' is stored twice")
                out[key] = handle.get(key)
    return out
