"""Atomic output folders: write into a temporary sibling, rename when complete.

A crash, an error or Ctrl-C never leaves a partial or corrupt output at the destination.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

from guardmerge.errors import GuardmergeError, OutputError, OutputExistsError

log = logging.getLogger(__name__)


_TMP_MARKER = ".guardmerge-tmp"  # inside a temporary output folder: "<pid> <host>" of its creator
_WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}
)
PathLike = Union[str, "os.PathLike[str]"]


def _real(path: Path) -> Path:
    """``path`` made absolute with symlinks resolved (for a path that may not exist yet)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _overlap(out: Path, source: Path) -> str | None:
    """How ``out`` collides with the input ``source``: 'is', 'contains', 'lies inside' or None."""
    if out == source:
        return "is"
    if out in source.parents:
        return "contains"
    if source in out.parents:
        return "lies inside"
    return None


def check_output(
    path: PathLike,
    *,
    force: bool = False,
    inputs: Iterable[PathLike | None] = (),
    file: bool = False,
) -> Path:
    """The one rule for every output path; call before any expensive work.

    Refuses: an existing ``path`` unless ``force``; a ``path`` that is, contains or lies inside one
    of ``inputs`` (base, experts, statistics and data files, source folder, config) or contains
    the working directory, force or not; an existing path of the wrong kind (a folder output
    that is a file, or with ``file``, a file output that is a folder); a path whose nearest
    existing parent is not a folder; a name the file system cannot hold.
    """
    out = Path(path)
    try:
        target = _real(out)
        exists = os.path.lexists(out)
        os.stat(out.parent if str(out.parent) else ".")  # ENAMETOOLONG, ENOTDIR surface here
    except FileNotFoundError:
        exists = False
    except OSError as exc:
        raise OutputError(f"output '{_short(out)}' is not a usable path: {exc.strerror}") from None
    if len(out.name.encode()) > 200:  # the temporary sibling adds a prefix and a suffix
        raise OutputError(f"output '{_short(out)}': file name too long ({len(out.name.encode())} bytes)")
    cwd = _real(Path.cwd())
    if target == cwd or target in cwd.parents:
        raise OutputError(f"output '{out}' is the working directory or contains it; name a new folder")
    for item in inputs:
        if item is None or str(item) == "":
            continue
        src = Path(item)
        try:
            if not src.exists():
                continue  # a hub id, or nothing on disk that could be harmed
        except OSError:
            continue
        how = _overlap(target, _real(src))
        if how is not None:
            raise OutputError(f"output '{out}' {how} the input '{src}'; write the output somewhere else")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"output '{out}': '{parent}' is a file, not a folder")
    if exists and not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it")
    if exists and file and out.is_dir():
        raise OutputError(f"output '{out}' is a folder; name a file")
    if exists and not file and not out.is_dir():
        raise OutputExistsError(f"output '{out}' exists and is not a folder")
    return out


def _short(path: Path, limit: int = 120) -> str:
    text = str(path)
    return text if len(text) <= limit else text[: limit // 2] + "..." + text[-limit // 2 :]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove temporary folders ``.OUT.tmp-*`` beside ``out`` left by a killed guardmerge run.

    Only folders with our marker, written on this host by a process that no longer exists, are
    removed; anything else (another tool's folder, a run still going) is left alone.
    """
    removed: list[Path] = []
    parent = out.parent if str(out.parent) else Path(".")
    try:
        candidates = list(parent.glob(f".{glob.escape(out.name)}.tmp-*"))
    except OSError:
        return removed
    for folder in candidates:
        try:
            pid_text, host = (folder / _TMP_MARKER).read_text().split()[:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if host != socket.gethostname() or pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log.warning("removed %s, left by an interrupted guardmerge run (process %d)", folder, pid)
    return removed


@contextmanager
def atomic_dir(path: PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary folder is removed and ``path`` is left as it was. Write
    errors (disk full, read-only, permissions) become an :class:`OutputError` naming ``path``.
    Stale temporary folders of killed runs beside ``path`` are removed first.
    """
    out = check_output(path, force=force)
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        (tmp / _TMP_MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        yield tmp
        (tmp / _TMP_MARKER).unlink(missing_ok=True)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        log.info("wrote %s", out)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in _WRITE_ERRNOS:
            raise OutputError(f"cannot write output '{_short(out)}': {exc.strerror or exc}") from None
        raise
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: PathLike, *, error: type[GuardmergeError] = GuardmergeError, what: str = "JSON") -> Any:
    """``path`` parsed as JSON, or ``error`` naming the file (binary, too deeply nested, invalid)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise error(f"{_short(p)}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{_short(p)} is not UTF-8 text (binary file? bad byte at offset {exc.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{_short(p)} is not valid {what}: nested too deeply") from None
    except ValueError as exc:
        raise error(f"{_short(p)} is not valid {what}: {exc}") from None
