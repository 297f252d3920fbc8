"""The safetensors header checks: ranges tile the data exactly, nothing read from a refused file
is quoted back (issue 21, defects 9 and 10)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardmerge.errors import CheckpointError
from guardmerge.io.safetensors import SafetensorsFile, parse_header
from guardmerge.models.checkpoint import Checkpoint
from tests.builders import copy_expert


def raw_file(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file with exactly ``header`` (JSON) and ``data`` (no checks)."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def two(a_offsets: list[int], b_offsets: list[int], data_len: int = 32) -> tuple[dict, bytes]:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": a_offsets},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": b_offsets},
    }
    return header, bytes(data_len)


def test_a_valid_file_reads_like_the_safetensors_library(tmp_path: Path) -> None:
    tensors = {"x": torch.randn(3, 5), "y": torch.arange(7, dtype=torch.int64), "z": torch.randn(2).half()}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        assert f.metadata == {"format": "pt"}
        for key, value in load_file(str(tmp_path / "t.safetensors")).items():
            assert torch.equal(f.get(key), value)


@pytest.mark.parametrize(
    ("a", "b", "data_len", "problem"),
    [
        ([0, 16], [8, 24], 24, "overlaps"),  # b starts inside a
        ([0, 16], [0, 16], 16, "overlaps"),  # b aliases a's bytes
        ([0, 16], [20, 36], 36, "gap"),  # b shifted: a gap before it
        ([0, 16], [16, 32], 40, "cover the data section"),  # trailing bytes nobody owns
        ([0, 16], [16, 32], 24, "larger than the file|cover"),  # b runs past the end
        ([0, 16], [16, 24], 24, "does not match its dtype and shape"),  # 8 bytes for 4 floats
    ],
)
def test_overlapping_shifted_or_aliased_ranges_are_refused(
    tmp_path: Path, a: list[int], b: list[int], data_len: int, problem: str
) -> None:
    header, data = two(a, b, data_len)
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=problem):
        SafetensorsFile(path)


def test_the_safetensors_library_refuses_what_guardmerge_refuses(tmp_path: Path) -> None:
    header, data = two([0, 16], [8, 24], 24)
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(Exception):  # noqa: B017 (the library's own error type)
        load_file(str(path))


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "negative size"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "lists of integers"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, "lists of integers"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}, "exactly dtype"),
        ({"a": [1, 2]}, "exactly dtype"),
        ({"__metadata__": {"k": 5}}, "__metadata__"),
        ([], "not a JSON object"),
    ],
)
def test_malformed_entries_are_refused(tmp_path: Path, header: object, problem: str) -> None:
    text = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4))
    with pytest.raises(CheckpointError, match=problem):
        SafetensorsFile(path)


def test_a_foreign_file_is_refused_without_quoting_its_bytes(tmp_path: Path) -> None:
    secret = b"admin:s3cr3tHash:0:0:admin:/home/admin:/bin/bash\n" * 4
    path = tmp_path / "passwd.safetensors"
    path.write_bytes(secret)
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    header_len = str(struct.unpack("<Q", secret[:8])[0])
    assert header_len not in str(info.value) and "s3cr3t" not in str(info.value)


def test_parse_header_reports_positions_relative_to_the_data() -> None:
    entries, meta = parse_header(json.dumps(two([0, 16], [16, 32])[0]).encode(), 32, 100)
    assert entries["b"] == (torch.float32, (4,), 116, 16) and meta == {}


def test_invalid_header_error_never_quotes_file_bytes(tmp_path: Path, merged_folder: Path) -> None:
    import guardmerge

    secret = "SECRET-" + "x" * 5000
    for header in (
        b'{"' + secret.encode() + b'": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]',
        json.dumps({secret: {"dtype": secret, "shape": [1], "data_offsets": [0, 4]}}).encode(),
        b"\xff\xfe" + secret.encode(),
        b"[" * 100_000 + b"]" * 100_000,
    ):
        folder = copy_expert(merged_folder, tmp_path / "m")
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
        for opener in (guardmerge.load, Checkpoint):
            with pytest.raises(CheckpointError) as info:
                opener(str(folder))
            assert "SECRET-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" not in str(
                info.value
            )
            assert len(str(info.value)) < 500
        shutil.rmtree(folder)
