"""One ``.safetensors`` file, its header parsed and checked before any tensor is read.

The checks are those of the safetensors format (and of the ``safetensors`` library, which
refuses the same files): an 8-byte little-endian header length within the file, a UTF-8 JSON
object, string-to-string ``__metadata__``, and for every tensor a known dtype, a shape of
non-negative integers, and ``data_offsets`` whose ranges tile the data section exactly: sorted,
contiguous, never overlapping, shifted or aliasing another tensor's bytes, and ending at the end
of the file. Each range holds exactly ``prod(shape) * itemsize`` bytes.

Tensors are read with positioned reads (``os.preadv``) at the offsets the header gives, never
through a memory map, so the pages of a read tensor do not stay counted in the process's memory.
Error messages name the file and, where the header parsed, the tensor; they never quote a value
read from a file that failed validation.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from guardmerge.errors import CheckpointError
from guardmerge.io.formats import clip, short_path

MAX_HEADER_BYTES = 100_000_000
"""The largest header accepted (the safetensors library's own limit)."""

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
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}

Entry = tuple[torch.dtype, tuple[int, ...], int, int]
"""A tensor's ``(dtype, shape, absolute byte offset, byte length)``."""


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("not an integer")
    return value


def parse_header(raw: bytes, data_len: int, data_start: int) -> tuple[dict[str, Entry], dict[str, str]]:
    """``(entries, metadata)`` of a header's JSON bytes, for a data section of ``data_len``
    bytes starting at ``data_start``; ``ValueError`` (a message safe to show) when malformed."""
    try:
        header = json.loads(raw)
    except RecursionError:
        raise ValueError("its header is nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("its header is not UTF-8 text") from None
    except ValueError:
        raise ValueError("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("its __metadata__ is not an object of strings")
    entries: dict[str, Entry] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        name = clip(key)
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor '{name}': expected exactly dtype, shape and data_offsets")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise ValueError(f"tensor '{name}' has an unsupported dtype")
        shape_raw, offsets = info["shape"], info["data_offsets"]
        try:
            if not isinstance(shape_raw, list) or not isinstance(offsets, list) or len(offsets) != 2:
                raise ValueError
            shape = tuple(_int(x) for x in shape_raw)
            begin, end = (_int(x) for x in offsets)
        except ValueError:
            raise ValueError(f"tensor '{name}': shape and data_offsets must be lists of integers") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end:
            raise ValueError(f"tensor '{name}' has a negative size or offsets out of order")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor '{name}': its byte range does not match its dtype and shape")
        entries[key] = (dtype, shape, data_start + begin, end - begin)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            kind = "overlaps another tensor's bytes" if begin < position else "leaves a gap before it"
            raise ValueError(f"tensor '{name}' {kind} (invalid data offsets)")
        position = end
    if position != data_len:
        raise ValueError("its tensors do not cover the data section exactly (invalid data offsets)")
    return entries, meta


class SafetensorsFile:
    """One ``.safetensors`` file: the header parsed and checked, tensors read on demand.

    Raises:
        CheckpointError: an unreadable file or a malformed header (see the module docstring).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{short_path(self.path)}: cannot open: {exc.strerror or exc}") from None
        try:
            size = os.fstat(self._fd).st_size
            if size < 8:
                raise ValueError("it is shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise ValueError("its header length field is larger than the file")
            self._data_start = 8 + header_len
            raw = os.pread(self._fd, header_len, 8)
            self.entries, self.metadata = parse_header(raw, size - self._data_start, self._data_start)
        except (ValueError, OSError) as exc:
            os.close(self._fd)
            self._fd = -1
            reason = str(exc) if isinstance(exc, ValueError) else (exc.strerror or "read error")
            raise CheckpointError(f"{short_path(self.path)} is not a readable safetensors file: {reason}") from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor ``key`` straight into ``out`` (contiguous, the stored dtype and element
        count; no intermediate copy) and return ``out`` with the stored shape."""
        dtype, shape, offset, nbytes = self.entries[key]
        if out.dtype != dtype or not out.is_contiguous() or out.numel() != math.prod(shape):
            raise CheckpointError(
                f"{short_path(self.path)}: buffer for tensor '{clip(key)}' does not match its dtype/size"
            )
        if nbytes:
            view = out.reshape(-1).view(torch.uint8).numpy().data
            done = 0
            while done < nbytes:
                try:
                    n = os.preadv(self._fd, [view[done:]], offset + done)
                except OSError as exc:
                    raise CheckpointError(
                        f"{short_path(self.path)}: cannot read tensor '{clip(key)}': {exc.strerror}"
                    ) from None
                if n <= 0:
                    raise CheckpointError(f"{short_path(self.path)}: the file ended inside tensor '{clip(key)}'")
                done += n
        return out.view(shape)

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` in a fresh tensor of its stored dtype and shape."""
        dtype, shape, _, _ = self.entries[key]
        return self.read_into(key, torch.empty(shape, dtype=dtype))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
