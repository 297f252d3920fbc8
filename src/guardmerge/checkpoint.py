"""Lazy access to Hugging Face checkpoints: a local folder or a hub id, same code path.

Tensors are read one at a time through ``safetensors.safe_open`` (memory-mapped), never the whole
model when one tensor is needed. Single-file and sharded (``model.safetensors.index.json``)
checkpoints are supported. Pickle checkpoints (``pytorch_model.bin``) can execute code when
loaded and are refused unless the caller passes ``allow_pickle=True``.

Tensor names are **canonical** (see :mod:`guardmerge.architectures`): the same tensor has the
same name whether the checkpoint is a headless ``BertModel``, a ``BertForMaskedLM`` or a
``BertForSequenceClassification``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from guardmerge.architectures import ArchitectureAdapter, get_adapter
from guardmerge.errors import CheckpointError

log = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "merges.txt"]


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


class Checkpoint:
    """A model folder opened for lazy, tensor-by-tensor reading.

    Attributes:
        source: what the user named (path or hub id).
        path: the local folder.
        config: the folder's ``config.json`` as a dict.
        adapter: the architecture adapter of ``config["model_type"]``.
    """

    def __init__(
        self, source: str | Path, *, allow_pickle: bool = False, revision: str | None = None
    ) -> None:
        self.source = str(source)
        self.path = resolve(source, revision=revision)
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
        try:
            data = json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise CheckpointError(f"{cfg} has no 'model_type' field")
        return data

    def _weight_files(self, allow_pickle: bool) -> tuple[list[Path], bool]:
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            return self._shards_from_index(index), False
        single = self.path / SAFETENSORS_FILE
        if single.is_file():
            return [single], False
        pickles = [p for p in (self.path / PICKLE_FILE, self.path / PICKLE_INDEX) if p.is_file()]
        if pickles:
            if not allow_pickle:
                raise CheckpointError(
                    f"{pickles[0]} is a pickle checkpoint, which can run arbitrary code when "
                    "loaded; guardmerge refuses it by default. Convert it to safetensors, or pass "
                    "--allow-pickle (allow_pickle: true in the config) if you trust its source."
                )
            if pickles[0].name == PICKLE_INDEX:
                return self._shards_from_index(pickles[0]), True
            return [pickles[0]], True
        raise CheckpointError(
            f"no weights in {self.path}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}"
        )

    def _shards_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid shard index: {exc}") from None
        shards = sorted({self.path / f for f in weight_map.values()})
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard {missing[0].name}, which is missing")
        return shards

    def _open_weights(self, allow_pickle: bool) -> None:
        files, pickled = self._weight_files(allow_pickle)
        if pickled:
            self._pickled = {}
            for f in files:
                try:
                    state = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as exc:
                    raise CheckpointError(f"cannot read {f}: {exc}") from None
                for key, value in state.items():
                    self._pickled[key] = value
                    self._add(key, f)
            return
        for f in files:
            try:
                handle = self._stack.enter_context(safe_open(str(f), framework="pt"))
                keys = list(handle.keys())
            except Exception as exc:
                raise CheckpointError(f"{f} is not a readable safetensors file: {exc}") from None
            self._files[f] = handle
            for key in keys:
                self._add(key, f)

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
        return tuple(self._files[file].get_slice(key).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return self.get(name).dtype if self._pickled is not None else self._slice_dtype(name)

    def _slice_dtype(self, name: str) -> torch.dtype:
        file, key = self._locate(name)
        code = self._files[file].get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES.get(code, torch.float32)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (memory-mapped), optionally cast."""
        file, key = self._locate(name)
        try:
            if self._pickled is not None:
                tensor = self._pickled[key]
            else:
                tensor = self._files[file].get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read tensor '{key}': {exc}") from None
        return tensor if dtype is None else tensor.to(dtype)

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

    def id2label(self) -> list[str]:
        """Label names in index order, from ``config.json`` (``LABEL_i`` where absent)."""
        raw = self.config.get("id2label") or {}
        n = int(self.config.get("num_labels") or len(raw) or 0)
        last_weight = self.adapter.head_names()[-2]
        if last_weight in self:
            n = self.shape(last_weight)[0]
        return [str(raw.get(str(i), raw.get(i, f"LABEL_{i}"))) for i in range(n)]

    def has_tokenizer(self) -> bool:
        return any(
            (self.path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")
        )

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, model_type={self.model_type!r})"


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
