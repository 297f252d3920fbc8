"""Where a benchmark result comes from: the commit and date that produced it, and the machine.

Every results row records :func:`produced`; every results file records :func:`environment`.
One module that every benchmark script imports (and that imports none of them).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def produced(*paths: str) -> dict[str, str]:
    """``{"commit", "date"}`` of a result; the commit ends in ``-dirty`` when ``src`` (or the given
    ``paths``) have uncommitted changes, so a result from unrecorded code says so."""
    commit = git("rev-parse", "--short", "HEAD")
    if git("status", "--porcelain", "--", "src", *paths):
        commit += "-dirty"
    return {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def environment() -> dict[str, object]:
    """The machine and software a results file was measured with."""
    import guardmerge

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version, threads = torch.__version__, torch.get_num_threads()
    except ImportError:
        torch_version, threads = None, None
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": threads,
        "load_average": list(os.getloadavg()),
        "torch": torch_version,
        "guardmerge": guardmerge.__version__,
        "commit": git("rev-parse", "--short", "HEAD"),
        "python": platform.python_version(),
    }
