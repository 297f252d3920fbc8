"""Freed memory goes back to the operating system after each served batch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from guardmerge.serve import memory


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_are_returned() -> None:
    start = _rss_mb()
    keep = []
    blocks = []
    for _ in range(3000):  # 64 KB blocks: under glibc's mmap threshold, so they live on the heap
        blocks.append(np.ones(8192))
        keep.append(np.ones(8))  # a live block after each: freeing alone cannot give the pages back
    print("DBG", _rss_mb())
    assert _rss_mb() > start + 150
    del blocks  # their pages usually stay resident: free() alone returns only the heap's top
    assert memory.release_free_memory()
    assert _rss_mb() < start + 60, "the ~190 MB of freed blocks stayed in the process"
    assert keep


def test_a_c_library_without_malloc_trim_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_free_memory() is False


def test_every_served_batch_releases_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from guardmerge.serve import inference

    calls: list[int] = []
    monkeypatch.setattr(inference, "release_free_memory", lambda: calls.append(1) or True)

    class Backend:
        def logits(self, texts: list[str], tasks: object = None) -> dict[str, np.ndarray]:
            return {"a": np.zeros((len(texts), 2))}

    run = inference.HeadRunner(Backend(), {}, "simple", inference.HealthState())  # type: ignore[arg-type]
    run(["x", "y"], None)
    run(["z"], None)
    assert len(calls) == 2
