from pathlib import Path

import pytest

from guardmerge.errors import OutputExistsError
from guardmerge.io import atomic_dir


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_success_renames_and_force_replaces(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "out" / "a").read_text() == "1"
    with pytest.raises(OutputExistsError), atomic_dir(tmp_path / "out"):
        pass
    with atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
