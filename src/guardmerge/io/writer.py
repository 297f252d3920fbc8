"""Streaming safetensors output: tensors written as they are produced, into size-capped shards.

The layout (every tensor's name, dtype and shape, in write order) is fixed before the first
tensor is merged, so each shard's header is written up front and each tensor's bytes are
appended the moment it exists: the merged model is never held in memory. One shard is written
as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors`` with the standard
``model.safetensors.index.json`` (``weight_map``), which transformers and guardmerge both read.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from guardmerge.errors import CheckpointError, ConfigError
from guardmerge.io.formats import SAFETENSORS_FILE, SAFETENSORS_INDEX, shard_name
from guardmerge.io.safetensors import DTYPE_CODES as _CODES

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """``'2GB'``, ``'500MiB'``, ``'1e9'`` or an int -> bytes."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"size '{text}' is not understood; write e.g. 2GB, 500MB or 1GiB")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"size '{text}' must be positive")
    return size


@dataclass(frozen=True)
class TensorSlot:
    """One output tensor: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(layout: Sequence[TensorSlot], max_shard_bytes: int | None) -> list[list[TensorSlot]]:
    """Split ``layout`` in order into shards of at most ``max_shard_bytes`` (a larger tensor
    gets a shard of its own)."""
    shards: list[list[TensorSlot]] = [[]]
    size = 0
    for slot in layout:
        if max_shard_bytes and shards[-1] and size + slot.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(slot)
        size += slot.nbytes
    return shards


class ShardedWriter:
    """Write tensors in layout order into a folder, shard by shard.

    Usage::

        with ShardedWriter(folder, layout, max_shard_bytes=2 * 10**9) as w:
            for name, tensor in produced:
                w.write(name, tensor)

    The file writes run on a background thread (at most ``pending`` tensors queued), so
    producing the next tensor overlaps writing the last; a tensor handed to :meth:`write`
    must not be modified afterwards. Write errors surface at the next call.
    """

    def __init__(
        self,
        folder: str | Path,
        layout: Sequence[TensorSlot],
        *,
        max_shard_bytes: int | None = None,
        metadata: Mapping[str, str] | None = None,
        pending: int = 2,
    ) -> None:
        names = [s.name for s in layout]
        if len(set(names)) != len(names):
            raise CheckpointError("output layout names a tensor twice")
        for s in layout:
            if s.dtype not in _CODES:
                raise CheckpointError(f"cannot write tensor '{s.name}' of dtype {s.dtype}")
        self.folder = Path(folder)
        self.shards = plan_shards(layout, max_shard_bytes)
        self.metadata = dict(metadata or {"format": "pt"})
        n = len(self.shards)
        self.files = [SAFETENSORS_FILE] if n == 1 else [shard_name(i, n) for i in range(n)]
        self._queue: Iterator[tuple[int, TensorSlot]] = ((i, s) for i, shard in enumerate(self.shards) for s in shard)
        self._fh: BinaryIO | None = None
        self._open_shard = -1
        self._max_pending = max(1, pending)
        self._pending: deque[Future[None]] = deque()
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> ShardedWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardmerge-write")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.finish()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            for fut in self._pending:
                fut.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending.clear()
        self._close_file()

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _start(self, shard: int) -> None:
        self._close_file()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for s in self.shards[shard]:
            header[s.name] = {
                "dtype": _CODES[s.dtype],
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.folder / self.files[shard], "wb")  # noqa: SIM115 (closed in _close_file)
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._open_shard = shard

    def _write_data(self, shard: int, slot: TensorSlot, tensor: torch.Tensor) -> None:
        """On the writer thread, in layout order: cast, open the shard if new, append the bytes."""
        if shard != self._open_shard:
            self._start(shard)
        data = tensor.detach().to(slot.dtype).contiguous().cpu()
        assert self._fh is not None
        if data.numel():
            self._fh.write(data.reshape(-1).view(torch.uint8).numpy().data)

    def _wait(self, keep: int) -> None:
        """Wait until at most ``keep`` writes are queued, raising the first write error."""
        while len(self._pending) > keep:
            fut = self._pending.popleft()
            try:
                fut.result()
            except OSError as exc:
                raise CheckpointError(f"writing {self.folder}: {exc}") from exc

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the next one of the layout, with its shape."""
        try:
            shard, slot = next(self._queue)
        except StopIteration:
            raise CheckpointError(f"tensor '{name}' is not in the output layout (all tensors written)") from None
        if slot.name != name:
            raise CheckpointError(f"output order broken: expected tensor '{slot.name}', got '{name}'")
        if tuple(tensor.shape) != slot.shape:
            raise CheckpointError(f"tensor '{name}': shape {list(tensor.shape)}, layout says {list(slot.shape)}")
        if self._pool is None:
            raise CheckpointError("ShardedWriter.write called outside its `with` block")
        self._wait(self._max_pending - 1)
        self._pending.append(self._pool.submit(self._write_data, shard, slot, tensor))

    def finish(self) -> None:
        """Check that every tensor was written; write the index for several shards."""
        self._wait(0)
        left = next(self._queue, None)
        if left is not None:
            raise CheckpointError(f"output incomplete: tensor '{left[1].name}' was never written")
        self._close_file()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for shard in self.shards for s in shard)},
                "weight_map": {s.name: self.files[i] for i, shard in enumerate(self.shards) for s in shard},
            }
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_tensors(
    folder: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a dict of tensors (in its order) as one file or shards."""
    layout = [TensorSlot(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(folder, layout, max_shard_bytes=max_shard_bytes, metadata=metadata) as w:
        for name, t in tensors.items():
            w.write(name, t)
