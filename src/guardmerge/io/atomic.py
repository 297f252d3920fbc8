"""Atomic outputs: check the path once, write into a temporary sibling, rename when complete.

A crash, an error, Ctrl-C or SIGKILL never leaves a partial or corrupt output at the
destination, and never touches an input:

- :func:`check_output` is the one rule for every output path (see there);
- :func:`atomic_dir` and :func:`atomic_file` write into ``.NAME.tmp-*`` beside the output and
  rename it into place when complete. Without ``force`` the rename never replaces anything (an
  output that appeared meanwhile, say from a concurrent run, makes this run fail with a clear
  error); with ``force`` the old output is first moved aside into ``.NAME.old-*``, then removed;
- temporaries and set-aside outputs of killed runs are cleaned by the next run
  (:func:`clean_stale_temps`), which also puts back an old output a run was killed between
  its two renames;
- outputs follow the process's umask (a temporary folder is created 0700 and opened up when
  it is renamed into place).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from guardmerge.errors import OutputError, OutputExistsError
from guardmerge.io.formats import PathLike, input_files, short_path

log = logging.getLogger(__name__)

_TMP_MARKER = ".guardmerge-tmp"  # inside a temporary or set-aside folder: "<pid> <host>" of its creator
_WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}
)


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

    Refuses, ``force`` or not: a ``path`` that is, contains or lies inside one of ``inputs``
    (base, experts, statistics and data files, source folder, config), or inside any file an
    input folder holds, symbolic links resolved (a hub snapshot's weights live in the cache's
    ``blobs/``); a ``path`` that is or contains the working directory; an existing ``path``
    that is a symbolic link, a device, a FIFO or a socket; an existing path of the wrong kind
    (a folder output that is a file, or with ``file``, a file output that is a folder); a path
    whose nearest existing parent is not a folder; a name the file system cannot hold. Refuses an
    existing ``path`` unless ``force``.
    """
    out = Path(path)
    try:
        target = _real(out)
        info = os.lstat(out) if os.path.lexists(out) else None
        os.stat(out.parent if str(out.parent) else ".")  # ENAMETOOLONG, ENOTDIR surface here
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise OutputError(f"output '{short_path(out)}' is not a usable path: {exc.strerror}") from None
    if len(out.name.encode()) > 200:  # the temporary sibling adds a prefix and a suffix
        raise OutputError(f"output '{short_path(out)}': file name too long ({len(out.name.encode())} bytes)")
    cwd = _real(Path.cwd())
    if target == cwd or target in cwd.parents:
        raise OutputError(f"output '{short_path(out)}' is the working directory or contains it; name a new folder")
    for src in input_files(inputs):
        how = _overlap(target, src)
        if how is not None:
            raise OutputError(
                f"output '{short_path(out)}' {how} the input '{short_path(src)}'; write the output somewhere else"
            )
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"output '{short_path(out)}': '{short_path(parent)}' is a file, not a folder")
    if info is None:
        return out
    if stat.S_ISLNK(info.st_mode):
        raise OutputError(f"output '{short_path(out)}' is a symbolic link; name the real path (or a new one)")
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        raise OutputError(f"output '{short_path(out)}' is a device, FIFO or socket, not a file or folder; refused")
    if not force:
        raise OutputExistsError(f"output '{short_path(out)}' already exists; pass --force to replace it")
    if file and stat.S_ISDIR(info.st_mode):
        raise OutputError(f"output '{short_path(out)}' is a folder; name a file")
    if not file and not stat.S_ISDIR(info.st_mode):
        raise OutputExistsError(f"output '{short_path(out)}' exists and is not a folder")
    return out


def _umask() -> int:
    """The process's umask, read without changing it where the system says it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _owner_gone(marker: str) -> bool:
    """Whether ``"<pid> <host>"`` names a process of this host that no longer exists."""
    try:
        pid_text, host = marker.split()[:2]
        pid = int(pid_text)
    except ValueError:
        return False
    return host in (_host(), socket.gethostname()) and pid != os.getpid() and not _pid_alive(pid)


def _marker() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove what killed guardmerge runs left beside ``out``: temporary outputs
    (``.OUT.tmp-*``) and set-aside old outputs (``.OUT.old-*``; when ``out`` itself is missing,
    the run was killed between its two renames and the old output is put back first).

    Only entries written on this host by a process that no longer exists are touched; anything
    else (another tool's files, a run still going) is left alone.
    """
    removed: list[Path] = []
    parent = out.parent if str(out.parent) else Path(".")
    name = glob.escape(out.name)
    try:
        candidates = sorted(parent.glob(f".{name}.tmp-*")) + sorted(parent.glob(f".{name}.old-*"))
    except OSError:
        return removed
    for entry in candidates:
        try:
            if entry.is_dir() and not entry.is_symlink():
                owner = (entry / _TMP_MARKER).read_text()
            else:  # a temporary file: ".OUT.tmp-<pid>-<host>-<random>"
                pid, host = entry.name.rsplit(".tmp-", 1)[1].split("-")[:2]
                owner = f"{pid} {host}"
        except (OSError, ValueError, IndexError):
            continue
        if not _owner_gone(owner):
            continue
        kept = entry / out.name
        if ".old-" in entry.name and kept.exists() and not os.path.lexists(out):
            os.replace(kept, out)
            log.warning("put back %s, which an interrupted guardmerge run had set aside", out)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        log.warning("removed %s, left by an interrupted guardmerge run", entry)
    return removed


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with ``EEXIST`` if ``dst`` exists (atomically where the
    system has ``renameat2``; a hard link for files, a plain rename for folders elsewhere, which
    fails on any non-empty ``dst``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(dst))
    if src.is_dir():
        if os.path.lexists(dst):
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
    else:
        os.link(src, dst)
        src.unlink()


def _put_in_place(tmp: Path, out: Path, force: bool) -> None:
    """The final rename: ``tmp`` becomes ``out``; an existing ``out`` is an error unless ``force``."""
    try:
        _rename_noreplace(tmp, out)
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        if not force:
            raise OutputExistsError(
                f"output '{short_path(out)}' appeared while this run was writing (another run?); "
                "nothing was replaced: pass --force to replace it"
            ) from None
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    (old / _TMP_MARKER).write_text(_marker())
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(path: PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` (see the module
    docstring for what happens when ``path`` exists or appears meanwhile).

    On any exception the temporary folder is removed and ``path`` is left as it was. Write
    errors (disk full, read-only, permissions) become an :class:`OutputError` naming ``path``.
    Stale temporaries of killed runs beside ``path`` are cleaned first.
    """
    out = check_output(path, force=force)
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        (tmp / _TMP_MARKER).write_text(_marker())
        yield tmp
        (tmp / _TMP_MARKER).unlink(missing_ok=True)
        os.chmod(tmp, 0o777 & ~_umask())
        _put_in_place(tmp, out, force)
        log.info("wrote %s", out)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in _WRITE_ERRNOS:
            raise OutputError(f"cannot write output '{short_path(out)}': {exc.strerror or exc}") from None
        raise
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: PathLike, *, force: bool = False, mode: str = "wb") -> Iterator[IO]:
    """Yield an open temporary file beside ``path``; on success it is flushed, synced and
    renamed to ``path`` (never replacing an existing file unless ``force``). On any error the
    temporary file is removed and ``path`` is left as it was; a full disk is an
    :class:`OutputError` naming ``path``."""
    out = check_output(path, force=force, file=True)
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-{_host()}-", dir=out.parent)
        tmp = Path(name)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        _put_in_place(tmp, out, force)
        tmp = None
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise OutputError(f"cannot write output '{short_path(out)}': {exc.strerror or exc}") from None
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
