"""Lazy access to Hugging Face checkpoints: a local folder or a hub id, same code path.

Tensors are read one at a time with positioned reads (``os.pread``) at the offsets the
safetensors header gives, never the whole model when one tensor is needed, and without a memory
map, so the pages of a read tensor do not stay counted in the process's memory. Single-file and
sharded (``model.safetensors.index.json``) checkpoints are supported. Pickle checkpoints
(``pytorch_model.bin``) can execute code when loaded and are refused unless the caller passes ``allow_pickle=True``.

Tensor names are **canonical** (see :mod:`guardmerge.models.adapters`): the same tensor has the
same name whether the checkpoint is a headless ``BertModel``, a ``BertForMaskedLM`` or a
``BertForSequenceClassification``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from guardmerge.errors import CheckpointError
from guardmerge.io import read_json
from guardmerge.models.adapters import ArchitectureAdapter, get_adapter, position_offset

log = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "merges.txt"]
# tensor-name endings of quantised checkpoints (GPTQ/AWQ, bitsandbytes int8 and 4-bit)
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
QUANTIZED_DTYPES = frozenset({torch.int8, torch.uint8})


def _clip(text: object, limit: int = 80) -> str:
    """``text`` for an error message: printable and bounded (never a file's raw bytes)."""
    s = repr(str(text))[1:-1]
    return s if len(s) <= limit else s[: limit - 3] + "..."


def index_shards(folder: Path, index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each checked to lie inside ``folder``.

    Raises:
        CheckpointError: an invalid index, a shard path outside the folder (``../``, absolute),
            or a missing shard.
    """
    data = read_json(index, error=CheckpointError, what="shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} is not a valid shard index: no 'weight_map' object")
    shards = set()
    for name in set(weight_map.values()):
        if not isinstance(name, str) or not name or "\0" in name:
            raise CheckpointError(f"{index}: shard entry '{_clip(name)}' is not a file name")
        # lexical: hub snapshots link their files to blobs elsewhere, which is the folder's own doing
        rel = os.path.normpath(name.replace("\\", "/"))
        if os.path.isabs(rel) or Path(name).is_absolute() or rel == ".." or rel.startswith("../") or rel == ".":
            raise CheckpointError(f"{index}: shard '{_clip(name)}' lies outside the model folder {folder}; refused")
        shards.add(folder / rel)
    missing = [s for s in sorted(shards) if not s.is_file()]
    if missing:
        raise CheckpointError(f"{index} names shard {missing[0].name}, which is missing")
    return sorted(shards)


def weight_files(folder: Path, *, allow_pickle: bool = False) -> tuple[list[Path], bool]:
    """The weight files of a model folder and whether they are pickles: the one check every
    path that opens a checkpoint goes through (guardmerge's reader, and transformers loads).

    Raises:
        CheckpointError: no weights, a bad shard index, or pickle weights without ``allow_pickle``.
    """
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        return index_shards(folder, index), False
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        return [single], False
    pickles = [p for p in (folder / PICKLE_FILE, folder / PICKLE_INDEX) if p.is_file()]
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{pickles[0]} is a pickle checkpoint, which can run arbitrary code when "
                "loaded; guardmerge refuses it by default. Convert it to safetensors, or pass "
                "--allow-pickle (allow_pickle: true in the config) if you trust its source."
            )
        if pickles[0].name == PICKLE_INDEX:
            return index_shards(folder, pickles[0]), True
        return [pickles[0]], True
    raise CheckpointError(f"no weights in {folder}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def check_weights(folder: Path, *, allow_pickle: bool = False) -> bool:
    """Refuse a folder :func:`weight_files` refuses, or a quantised one (``quantization_config``);
    return whether its weights are pickles. Call before handing the folder to transformers, and
    pass ``use_safetensors=not pickled`` there so it never falls back to a pickle."""
    _, pickled = weight_files(folder, allow_pickle=allow_pickle)
    cfg = folder / "config.json"
    if cfg.is_file():
        data = read_json(cfg, error=CheckpointError, what="model config")
        if isinstance(data, dict) and data.get("quantization_config"):
            raise CheckpointError(
                f"{cfg}: a quantised checkpoint (quantization_config); guardmerge merges floating-point "
                "weights only: use the unquantised model"
            )
    return pickled


def resolve(source: str | Path, *, revision: str | None = None) -> Path:
    """A local folder for ``source``: the folder itself, or a hub snapshot downloaded for it.

    Raises:
        CheckpointError: neither a local folder nor a reachable hub repository.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise CheckpointError(f"'{source}' is a file; expected a model folder or a hub id")
    text = str(source)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local:
        raise CheckpointError(f"model folder '{source}' not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # the hub raises many types: offline, 404, auth
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"'{source}' is not a local folder and could not be fetched from the Hugging Face "
            f"Hub (not found, or offline: {reason}). Pass a local model folder, or run once "
            "online to cache it."
        ) from None


class SafetensorsFile:
    """One ``.safetensors`` file: the header parsed and checked, tensors read on demand.

    Raises:
        CheckpointError: unreadable file, malformed header, or offsets outside the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open: {exc}") from None
        try:
            size = os.fstat(self._fd).st_size
            if size < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if header_len > size - 8 or header_len > 100_000_000:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            try:
                header = json.loads(os.pread(self._fd, header_len, 8))
            except RecursionError:
                raise ValueError("header JSON is nested too deeply") from None
            except UnicodeDecodeError as exc:
                raise ValueError(f"header is not UTF-8 text (bad byte at offset {exc.start})") from None
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            self._data_start = 8 + header_len
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for key, info in header.items():
                if not isinstance(info, dict):
                    raise ValueError(f"entry '{_clip(key)}' is not an object")
                dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
                if dtype is None:
                    raise ValueError(f"tensor '{_clip(key)}' has unsupported dtype '{_clip(info['dtype'], 20)}'")
                begin, end = (int(x) for x in info["data_offsets"])
                shape = tuple(int(x) for x in info["shape"])
                count = math.prod(shape)
                if not 0 <= begin <= end or self._data_start + end > size:
                    raise ValueError(f"tensor '{_clip(key)}' lies outside the file")
                if min(shape, default=0) < 0 or end - begin != count * dtype.itemsize:
                    raise ValueError(f"tensor '{_clip(key)}': {end - begin} bytes for shape {_clip(list(shape))}")
                self.entries[key] = (dtype, shape, self._data_start + begin, end - begin)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError, struct.error) as exc:
            os.close(self._fd)
            reason = (
                str(exc)
                if isinstance(exc, ValueError) and not isinstance(exc, UnicodeDecodeError)
                else f"malformed header ({type(exc).__name__}: {_clip(exc)})"
            )
            raise CheckpointError(f"{path} is not a readable safetensors file: {reason}") from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor ``key`` straight into ``out`` (contiguous, the stored dtype and element
        count; no intermediate copy) and return ``out`` with the stored shape."""
        dtype, shape, offset, nbytes = self.entries[key]
        if out.dtype != dtype or not out.is_contiguous() or out.numel() != math.prod(shape):
            raise CheckpointError(f"{self.path}: buffer for tensor '{key}' does not match its dtype/size")
        if nbytes:
            view = out.reshape(-1).view(torch.uint8).numpy().data
            done = 0
            while done < nbytes:
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: file ended inside tensor '{key}'")
                done += n
        return out.view(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Checkpoint:
    """A model folder opened for lazy, tensor-by-tensor reading.

    Attributes:
        source: what the user named (path or hub id).
        path: the local folder.
        config: the folder's ``config.json`` as a dict.
        adapter: the architecture adapter of ``config["model_type"]``.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        allow_pickle: bool = False,
        revision: str | None = None,
        folder: Path | None = None,
        where: str | None = None,
    ) -> None:
        """``folder``: the local folder ``source`` already resolved to (a :class:`MergeJob`'s);
        ``where``: how errors name this checkpoint (default: ``source``; the engine names the expert)."""
        self.source = str(source)
        self.where = where or self.source
        self.path = folder if folder is not None else resolve(source, revision=revision)
        self.config = self._read_config()
        self.adapter: ArchitectureAdapter = get_adapter(
            str(self.config.get("model_type", "")), where=str(self.path / "config.json")
        )
        self._stack = ExitStack()
        self._files: dict[Path, Any] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._index: dict[str, tuple[Path, str]] = {}  # canonical -> (file, stored key)
        self._open_weights(allow_pickle)

    # -- loading -------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{cfg} is missing: not a Hugging Face model folder")
        data = read_json(cfg, error=CheckpointError, what="model config")
        if not isinstance(data, dict) or "model_type" not in data:
            raise CheckpointError(f"{cfg} has no 'model_type' field")
        return data

    def _weight_files(self, allow_pickle: bool) -> tuple[list[Path], bool]:
        check_weights(self.path, allow_pickle=allow_pickle)
        return weight_files(self.path, allow_pickle=allow_pickle)

    def _open_weights(self, allow_pickle: bool) -> None:
        files, pickled = self._weight_files(allow_pickle)
        if pickled:
            self._pickled = {}
            for f in files:
                try:
                    state = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as exc:
                    raise CheckpointError(f"cannot read {f}: {exc}") from None
                if not isinstance(state, dict):
                    raise CheckpointError(f"{f} does not hold a state dict")
                for key, value in state.items():
                    if not isinstance(value, torch.Tensor):
                        raise CheckpointError(f"{f}: entry '{_clip(key)}' is not a tensor")
                    self._pickled[key] = value
                    self._add(key, f)
        else:
            for f in files:
                handle = SafetensorsFile(f)
                self._stack.callback(handle.close)
                self._files[f] = handle
                for key in handle.keys():  # noqa: SIM118 (not a dict: it has no __iter__)
                    self._add(key, f)
        self._check_dtypes()

    def _check_dtypes(self) -> None:
        """Refuse quantised checkpoints and weights that are not floating point, by name."""
        for canonical, (file, key) in self._index.items():
            if key.endswith(QUANTIZED_SUFFIXES):
                raise CheckpointError(
                    f"{self.where}: tensor '{_clip(key)}' in {file.name} belongs to a quantised checkpoint "
                    "(GPTQ/AWQ/bitsandbytes); guardmerge merges floating-point weights only: use the unquantised model"
                )
            dtype = self.dtype(canonical)
            if dtype in QUANTIZED_DTYPES:
                raise CheckpointError(
                    f"{self.where}: tensor '{_clip(key)}' in {file.name} is {str(dtype).removeprefix('torch.')}, "
                    "a quantised checkpoint; guardmerge merges floating-point weights only: use the unquantised model"
                )
            if not dtype.is_floating_point and canonical.endswith((".weight", ".bias")):
                raise CheckpointError(
                    f"{self.where}: tensor '{_clip(key)}' in {file.name} is {str(dtype).removeprefix('torch.')}; "
                    "weights and biases must be floating point"
                )

    def _add(self, key: str, file: Path) -> None:
        canonical = self.adapter.canonical(key)
        if canonical in self._index:
            raise CheckpointError(f"{file}: tensor '{canonical}' is stored twice")
        self._index[canonical] = (file, key)

    # -- access --------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Canonical names of every stored tensor."""
        return list(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def shape(self, name: str) -> tuple[int, ...]:
        file, key = self._locate(name)
        if self._pickled is not None:
            return tuple(self._pickled[key].shape)
        return self._files[file].entries[key][1]

    def dtype(self, name: str) -> torch.dtype:
        file, key = self._locate(name)
        if self._pickled is not None:
            return self._pickled[key].dtype
        return self._files[file].entries[key][0]

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor into a fresh tensor, optionally cast (see :meth:`read_into`)."""
        return self.read_into(name, torch.empty(self.shape(name), dtype=dtype or self.dtype(name)))

    def read_into(
        self, name: str, out: torch.Tensor, scratch: Callable[[torch.dtype], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Read one tensor into ``out`` (contiguous, same element count), casting to ``out.dtype``.

        Stored in ``out``'s dtype, the bytes go straight from the file into ``out``; otherwise
        they are read into ``scratch(stored_dtype)`` (a reusable buffer of the tensor's size; a
        fresh one when None) and cast. Returns ``out`` with the stored shape.
        """
        file, key = self._locate(name)
        shape = self.shape(name)
        stored = self.dtype(name)
        if out.dtype.is_floating_point and not stored.is_floating_point:
            raise CheckpointError(
                f"{self.where}: tensor '{name}' is {str(stored).removeprefix('torch.')}, "
                "where a floating-point tensor is expected"
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
            raise CheckpointError(f"{file}: cannot read tensor '{key}': {exc}") from None
        if result.dtype.is_floating_point and not bool(torch.isfinite(result).all()):
            raise CheckpointError(f"{self.where}: tensor '{name}' holds NaN or Inf values; refused")
        return result

    def _locate(self, name: str) -> tuple[Path, str]:
        try:
            return self._index[name]
        except KeyError:
            raise CheckpointError(f"{self.source}: no tensor '{name}'") from None

    def items(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.get(name)

    # -- metadata ------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    @property
    def problem(self) -> str:
        """The head kind of this classifier: ``single_label``, ``multi_label`` (``problem_type:
        multi_label_classification``) or ``token`` (the family's ``*ForTokenClassification``)."""
        return self.adapter.problem(self.config)

    def id2label(self) -> list[str]:
        """Label names in index order, from ``config.json`` (``LABEL_i`` where absent)."""
        raw = self.config.get("id2label") or {}
        if not isinstance(raw, dict):
            raise CheckpointError(f"{self.where}: config.json 'id2label' is not an object")
        n = int(self.config.get("num_labels") or len(raw) or 0)
        last_weight = self.adapter.label_weight(self.problem)
        if last_weight in self:
            rows = self.shape(last_weight)[0]
            declared = self.config.get("num_labels")
            if (raw and len(raw) != rows) or (declared is not None and declared != rows):
                count = declared if declared is not None and declared != rows else len(raw)
                raise CheckpointError(
                    f"{self.where}: config.json declares {count} labels but its classifier "
                    f"'{last_weight}' has {rows} outputs; fix id2label/num_labels"
                )
            n = rows
        return [str(raw.get(str(i), raw.get(i, f"LABEL_{i}"))) for i in range(n)]

    def has_tokenizer(self) -> bool:
        return any((self.path / f).is_file() for f in TOKENIZER_VOCAB_FILES)

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, model_type={self.model_type!r})"


TOKENIZER_VOCAB_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spm.model",  # DeBERTa-v2/v3
    "spiece.model",  # ALBERT
    "sentencepiece.bpe.model",  # XLM-R
    "tokenizer.model",
)
"""Files that make a folder's tokenizer: any one of them means the folder carries one."""

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "BOOL": torch.bool,
}


def position_limit(config: Any) -> int | None:
    """The most tokens per text ``config`` (a ``config.json`` dict) can embed, or None if unknown.

    RoBERTa-style models offset positions by ``pad_token_id + 1`` (514 positions: 512 tokens).
    """
    n = config.get("max_position_embeddings") if isinstance(config, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    if position_offset(config):
        pad = config.get("pad_token_id")
        n -= (pad if isinstance(pad, int) else 1) + 1
    return max(n, 1)


def capped_length(max_length: int, config: Any, what: str, *, level: int = logging.INFO) -> int:
    """``max_length`` capped at the model's positions (:func:`position_limit`), logged when capped."""
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        log.log(level, "%s: max_length %d capped at %d (the model's max_position_embeddings)", what, max_length, limit)
        return limit
    return max_length
