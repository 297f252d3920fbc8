import os
import subprocess
import sys
from pathlib import Path

import pytest

from guardmerge.errors import OutputExistsError
from guardmerge.io import atomic_dir
from guardmerge.merge.job import MergeJob


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


# -- issue 21: data loss ---------------------------------------------------------------------


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_blob_linked_expert_survives_force_onto_its_blobs(tmp_path: Path, zoo: dict[str, Path]) -> None:
    import os
    import shutil

    from guardmerge.config import parse_config
    from guardmerge.errors import OutputError
    from guardmerge.merge.stages import merge_to_folder

    repo = tmp_path / "hub" / "models--org--hate"
    snapshot, blobs = repo / "snapshots" / "rev", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in zoo["hate"].iterdir():
        shutil.copy(f, blobs / f"sha-{f.name}")
        (snapshot / f.name).symlink_to(os.path.relpath(blobs / f"sha-{f.name}", snapshot))
    before = {p.name: p.read_bytes() for p in blobs.iterdir()}
    cfg = parse_config(
        {"base_model": str(zoo["base"]), "experts": [{"model": str(snapshot), "task": "hate"}], "align_heads": False}
    )
    for out in (blobs, blobs / "sha-model.safetensors", repo):
        with pytest.raises(OutputError, match="input"):
            merge_to_folder(MergeJob.of(cfg), out, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in blobs.iterdir()} == before


@pytest.mark.parametrize("kind", ["fifo", "symlink", "device"])
def test_special_files_and_links_are_never_replaced(tmp_path: Path, kind: str) -> None:
    import os

    from guardmerge.errors import OutputError
    from guardmerge.io import atomic_file, check_output

    target = tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink":
        target.symlink_to("/dev/null")
    else:
        target = Path("/dev/null")
    with pytest.raises(OutputError):
        check_output(target, force=True, file=True)
    with pytest.raises(OutputError), atomic_file(target, force=True) as fh:
        fh.write(b"x")
    assert target.is_symlink() or not target.is_file()


def test_atomic_file_never_replaces_without_force_and_survives_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from guardmerge.errors import OutputError
    from guardmerge.io import atomic_file

    out = tmp_path / "results.json"
    with atomic_file(out, mode="w") as fh:
        fh.write("first")
    with pytest.raises(OutputExistsError), atomic_file(out, mode="w") as fh:
        fh.write("second")
    assert out.read_text() == "first"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left"), atomic_file(out, force=True, mode="w") as fh:
        fh.write("third")
    assert out.read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_run_that_finishes_second_never_replaces_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first, second = atomic_dir(out), atomic_dir(out)
    tmp1, tmp2 = first.__enter__(), second.__enter__()
    (tmp1 / "who").write_text("first")
    (tmp2 / "who").write_text("second")
    first.__exit__(None, None, None)
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        second.__exit__(None, None, None)
    assert (out / "who").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_old_output_set_aside_by_a_killed_run_is_put_back(tmp_path: Path) -> None:
    import socket

    old = tmp_path / ".out.old-abc"
    (old / "out").mkdir(parents=True)
    (old / "out" / "model").write_text("previous")
    (old / ".guardmerge-tmp").write_text(f"{dead_pid()} {socket.gethostname()}\n")
    with atomic_dir(tmp_path / "other") as tmp:  # a run beside another output leaves it alone
        (tmp / "x").write_text("1")
    assert old.exists()
    with pytest.raises(OutputExistsError), atomic_dir(tmp_path / "out"):  # put back, so out exists again
        pass
    assert (tmp_path / "out" / "model").read_text() == "previous" and not old.exists()


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    from guardmerge.io import atomic_file

    previous = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a").write_text("1")
        with atomic_file(tmp_path / "file.bin") as fh:
            fh.write(b"1")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "file.bin").stat().st_mode) == 0o640


def test_stale_temporary_folders_of_dead_runs_are_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from guardmerge.io import atomic_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / ".out.tmp-dead1"
    alive = tmp_path / ".out.tmp-alive"
    foreign = tmp_path / ".out.tmp-nomarker"
    other = tmp_path / ".other.tmp-dead2"
    for folder, pid in ((stale, dead.pid), (alive, os.getppid()), (foreign, None), (other, dead.pid)):
        folder.mkdir()
        (folder / "model.safetensors").write_text("partial")
        if pid is not None:
            (folder / ".guardmerge-tmp").write_text(f"{pid} {host}\n")
    with caplog.at_level("WARNING"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert not stale.exists() and alive.exists() and foreign.exists() and other.exists()
    assert "interrupted guardmerge run" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a"]  # the marker never reaches the output
