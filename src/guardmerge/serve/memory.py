"""Giving freed memory back to the operating system after each batch.

Batches of varying shapes (1 to ``--max-texts`` texts, padded to the longest) leave glibc's heap
fragmented: freed activations stay in the process and a server's RSS keeps climbing.
``malloc_trim(0)`` after each batch returns the free pages; ``benchmarks/soak.py`` measures the
server's RSS growth under load (``benchmarks/results/reliability_soak.json``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        log.debug("no malloc_trim in this C library: freed memory stays with the allocator")
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free heap pages to the operating system; whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
