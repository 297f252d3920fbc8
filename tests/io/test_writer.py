"""Streaming sharded safetensors output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from guardmerge.errors import CheckpointError, ConfigError
from guardmerge.io.checkpoint import read_tensors
from guardmerge.io.formats import SAFETENSORS_INDEX as INDEX_FILE
from guardmerge.io.writer import ShardedWriter, TensorSlot, parse_size, write_tensors


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(10, 10, generator=g),  # 400 bytes
        "b": torch.randn(30, generator=g).to(torch.bfloat16),  # 60 bytes
        "c": torch.arange(7),  # 56 bytes
        "d": torch.randn(5, 20, generator=g),  # 400 bytes
        "empty": torch.zeros(0, 3),
    }


def test_single_file_round_trips_with_stock_safetensors(tmp_path: Path) -> None:
    write_tensors(tmp_path, tensors())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    back = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors().items())


def test_shards_respect_the_size_cap_and_the_index_maps_every_tensor(tmp_path: Path) -> None:
    write_tensors(tmp_path, tensors(), max_shard_bytes=500)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["weight_map"]["a"] == files[0] and index["weight_map"]["d"] == files[1]
    assert index["metadata"]["total_size"] == 400 + 60 + 56 + 400
    for f in files:  # each shard is a valid safetensors file on its own, within the cap
        assert sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / f)).values()) <= 516
    back = read_tensors(tmp_path)
    assert set(back) == set(tensors()) and all(torch.equal(back[k], v) for k, v in tensors().items())


def test_writer_refuses_out_of_order_wrong_shape_and_incomplete_output(tmp_path: Path) -> None:
    layout = [TensorSlot("x", torch.float32, (2,)), TensorSlot("y", torch.float32, (3,))]
    with (
        pytest.raises(CheckpointError, match="expected tensor 'x', got 'y'"),
        ShardedWriter(tmp_path / "o", layout) as w,
    ):
        w.write("y", torch.zeros(3))
    with (
        pytest.raises(CheckpointError, match=r"shape \[3\], layout says \[2\]"),
        ShardedWriter(tmp_path / "p", layout) as w,
    ):
        w.write("x", torch.zeros(3))
    with pytest.raises(CheckpointError, match="'y' was never written"), ShardedWriter(tmp_path / "q", layout) as w:
        w.write("x", torch.zeros(2))


def test_writer_casts_to_the_layout_dtype(tmp_path: Path) -> None:
    layout = [TensorSlot("x", torch.bfloat16, (4,))]
    with ShardedWriter(tmp_path, layout) as w:
        w.write("x", torch.tensor([1.0, 2.5, -3.0, 1e-3]))
    back = read_tensors(tmp_path)["x"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, torch.tensor([1.0, 2.5, -3.0, 1e-3]).to(torch.bfloat16))


@pytest.mark.parametrize(("text", "size"), [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1e3", 1000), (64, 64)])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2XB", "0", "-1GB"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_non_contiguous_tensors_and_metadata_round_trip(tmp_path: Path) -> None:
    from safetensors import safe_open

    view = torch.randn(4)[::2]  # non-contiguous
    write_tensors(tmp_path, {"d": view}, metadata={"format": "pt", "k": "v"})
    back = load_file(str(tmp_path / "model.safetensors"))
    assert set(back) == {"d"}
    assert back["d"].dtype == view.dtype and torch.equal(back["d"], view.contiguous())
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


def test_write_errors_on_the_writer_thread_surface_with_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = [TensorSlot("x", torch.float32, (2,)), TensorSlot("y", torch.float32, (2,))]

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardedWriter, "_write_data", lambda self, *a: full())
    with (
        pytest.raises(CheckpointError, match=r"writing .*: \[Errno 28\] No space left"),
        ShardedWriter(tmp_path / "o", layout) as w,
    ):
        w.write("x", torch.zeros(2))
        w.write("y", torch.zeros(2))
