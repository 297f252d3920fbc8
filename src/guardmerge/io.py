"""Atomic output folders: write into a temporary sibling, rename when complete.

A crash, an error or Ctrl-C never leaves a partial or corrupt output at the destination.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from guardmerge.errors import OutputExistsError

log = logging.getLogger(__name__)


def check_output(path: str | Path, *, force: bool = False) -> Path:
    """Refuse an existing ``path`` unless ``force``; call before any expensive work."""
    out = Path(path)
    if out.exists() and not force:
        raise OutputExistsError(f"output '{out}' already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output '{out}' exists and is not a folder")
    return out


@contextmanager
def atomic_dir(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary folder is removed and ``path`` is left as it was.
    """
    out = check_output(path, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        log.info("wrote %s", out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
