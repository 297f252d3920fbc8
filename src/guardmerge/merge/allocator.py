"""Process-wide allocator tuning for long streaming merges (glibc only; a no-op elsewhere).

A merge walks every tensor in column chunks, so it allocates and frees the same few
chunk-sized temporaries (about 16 MB each) thousands of times. glibc's defaults hand each such
block back to the kernel on ``free`` and page-fault it in again on the next ``malloc``: on a
1B-parameter merge that is tens of seconds of kernel time. Raising the mmap threshold to its
maximum (32 MiB) and keeping freed heap memory (trim threshold 1 GiB) lets the temporaries be
reused instead; peak memory is unchanged up to the retained slack.

Only the command-line merge calls :func:`tune_for_streaming`: a library must not change the
allocator of the process that imports it.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


def tune_for_streaming() -> bool:
    """Set glibc's mmap threshold, trim threshold and top pad for chunked merging.

    Returns whether the settings were applied (False off Linux/glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_TOP_PAD, TOP_PAD),
        )
    )
    log.debug("allocator tuned for streaming merges: %s", ok)
    return ok
