"""Virtual environments for the tools the benchmarks compare against (never guardmerge dependencies).

``tool_env(folder, packages, dist, version)`` creates ``folder`` with ``python -m venv`` and
``pip install``s ``packages`` when ``dist`` is not installed there yet, then checks that ``dist``
is at ``version``. Used by merge_speed.py (mergekit) and vs_llm_guard.py (llm-guard).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("bench.toolenv")


def installed_version(python: Path, dist: str) -> str | None:
    """The version of distribution ``dist`` in the environment of ``python`` (None: absent)."""
    res = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
    )
    return res.stdout.strip() if res.returncode == 0 else None


def tool_env(folder: Path, packages: Sequence[str], dist: str, version: str) -> Path:
    """The ``python`` of a virtual environment at ``folder`` holding ``dist`` ``version``
    (created, and ``packages`` installed into it, when missing)."""
    python = folder / "bin" / "python"
    if not python.is_file() or installed_version(python, dist) is None:
        log.info("creating %s with %s", folder, " ".join(packages))
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(folder / "bin" / "pip"), "install", "-q", *packages], check=True)
    found = installed_version(python, dist)
    if found != version:
        raise SystemExit(f"{folder} holds {dist} {found}, not {version}")
    return python
