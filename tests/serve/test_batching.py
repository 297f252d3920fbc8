"""MicroBatcher alone: grouping, bounds, routing, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from guardmerge.errors import GuardmergeError
from guardmerge.serve.batching import MicroBatcher, QueueFullError


class Recorder:
    """``infer`` that returns each text's number as its logit row and records batch sizes."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.tasks: list[object] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, texts: Sequence[str], tasks: Sequence[str] | None) -> dict[str, np.ndarray]:
        self.sizes.append(len(texts))
        self.tasks.append(tasks)
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        col = np.array([[float(t)] for t in texts], dtype=np.float32)
        return {"a": col, "b": -col}


def run(coro):
    return asyncio.run(coro)


def test_concurrent_callers_are_grouped_and_routed() -> None:
    rec = Recorder()

    async def main() -> list[dict[str, np.ndarray]]:
        b = MicroBatcher(rec, max_batch=8, max_wait_ms=100)
        await b.start()
        try:
            return await asyncio.gather(*(b.submit([str(i), str(i + 100)]) for i in range(8)))
        finally:
            await b.stop()

    outs = run(main())
    for i, out in enumerate(outs):
        assert out["a"][:, 0].tolist() == [i, i + 100] and out["b"][:, 0].tolist() == [-i, -i - 100]
    assert rec.sizes == [8, 8]  # 16 texts, batches of at most 8, none split across a request
    assert all(name.startswith("guardmerge-infer") for name in rec.threads)


def test_lone_request_waits_at_most_max_wait() -> None:
    rec = Recorder()

    async def main() -> float:
        b = MicroBatcher(rec, max_batch=32, max_wait_ms=20)
        await b.start()
        try:
            t0 = time.perf_counter()
            await b.submit(["1"])
            return time.perf_counter() - t0
        finally:
            await b.stop()

    assert run(main()) < 1.0 and rec.sizes == [1]


def test_large_request_is_split_into_max_batch_chunks() -> None:
    rec = Recorder()

    async def main() -> dict[str, np.ndarray]:
        b = MicroBatcher(rec, max_batch=4, max_wait_ms=0)
        await b.start()
        try:
            return await b.submit([str(i) for i in range(10)], ["b"])
        finally:
            await b.stop()

    out = run(main())
    assert list(out) == ["b"] and out["b"][:, 0].tolist() == [-float(i) for i in range(10)]
    assert rec.sizes == [4, 4, 2] and rec.tasks == [["b"]] * 3


def test_union_of_tasks_per_batch() -> None:
    rec = Recorder()

    async def main() -> list[dict[str, np.ndarray]]:
        b = MicroBatcher(rec, max_batch=8, max_wait_ms=100)
        await b.start()
        try:
            return await asyncio.gather(b.submit(["1"], ["a"]), b.submit(["2"], ["b"]))
        finally:
            await b.stop()

    x, y = run(main())
    assert list(x) == ["a"] and list(y) == ["b"] and rec.tasks == [["a", "b"]]


def test_failure_reaches_only_the_failing_request() -> None:
    """A batch that fails is retried request by request: only the request that fails alone fails."""
    calls: list[list[str]] = []

    def picky(texts: Sequence[str], tasks: Sequence[str] | None) -> dict[str, np.ndarray]:
        calls.append(list(texts))
        if "bad" in texts:
            raise ValueError("bad text")
        return {"a": np.array([[float(t)] for t in texts], np.float32)}

    async def main() -> tuple[list, dict]:
        b = MicroBatcher(picky, max_batch=8, max_wait_ms=50)
        await b.start()
        try:
            first = await asyncio.gather(
                b.submit(["1"]), b.submit(["bad"]), b.submit(["2", "3"]), return_exceptions=True
            )
            return first, await b.submit(["4"])
        finally:
            await b.stop()

    (one, bad, two), later = run(main())
    assert isinstance(bad, ValueError)
    assert one["a"].tolist() == [[1.0]] and two["a"].tolist() == [[2.0], [3.0]] and later["a"].tolist() == [[4.0]]
    # one batch of all three requests, then each alone, then the later request
    assert calls == [["1", "bad", "2", "3"], ["1"], ["bad"], ["2", "3"], ["4"]]


def test_lone_failing_request_is_not_retried() -> None:
    calls = {"n": 0}

    def failing(texts: Sequence[str], tasks: Sequence[str] | None) -> dict[str, np.ndarray]:
        calls["n"] += 1
        raise ValueError("boom")

    async def main() -> None:
        b = MicroBatcher(failing, max_batch=8, max_wait_ms=0)
        await b.start()
        try:
            with pytest.raises(ValueError, match="boom"):
                await b.submit(["1"])
        finally:
            await b.stop()

    run(main())
    assert calls["n"] == 1


def test_malformed_output_fails_its_callers_not_the_collector() -> None:
    def short(texts: Sequence[str], tasks: Sequence[str] | None) -> dict[str, np.ndarray]:
        rows = 1 if "short" in texts else len(texts)
        return {"a": np.zeros((rows, 1), np.float32)}

    async def main() -> tuple[BaseException | dict, dict, bool]:
        b = MicroBatcher(short, max_batch=8, max_wait_ms=0)
        await b.start()
        try:
            bad = (await asyncio.gather(b.submit(["short", "x"]), return_exceptions=True))[0]
            return bad, await b.submit(["1", "2"]), b.running
        finally:
            await b.stop()

    bad, later, running = run(main())
    assert isinstance(bad, RuntimeError) and later["a"].shape == (2, 1) and running


def test_queue_limit_and_lifecycle() -> None:
    rec = Recorder(delay=0.2)

    async def main() -> None:
        b = MicroBatcher(rec, max_batch=2, max_wait_ms=0, max_queue=2)
        with pytest.raises(GuardmergeError, match="not running"):
            await b.submit(["1"])
        await b.start()
        running = asyncio.ensure_future(b.submit(["1", "2"]))
        await asyncio.sleep(0.05)  # the first batch runs; the queue is empty
        waiting = asyncio.ensure_future(b.submit(["3", "4"]))
        await asyncio.sleep(0)
        assert b.queued == 2
        with pytest.raises(QueueFullError, match="limit 2"):
            await b.submit(["5"])
        assert (await running)["a"].shape == (2, 1) and (await waiting)["a"].shape == (2, 1)
        await b.stop()
        assert not b.running

    run(main())
    with pytest.raises(GuardmergeError, match="max_batch"):
        MicroBatcher(rec, max_batch=0)


def test_stop_fails_running_and_queued_callers() -> None:
    rec = Recorder(delay=0.2)

    async def main() -> list:
        b = MicroBatcher(rec, max_batch=1, max_wait_ms=0)
        await b.start()
        calls = [asyncio.ensure_future(b.submit([str(i)])) for i in range(2)]
        await asyncio.sleep(0.05)  # "0" runs, "1" waits
        await b.stop()
        return await asyncio.gather(*calls, return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, GuardmergeError) and "shutting down" in str(r) for r in results)


def test_cancelled_caller_is_skipped() -> None:
    rec = Recorder(delay=0.1)

    async def main() -> dict[str, np.ndarray]:
        b = MicroBatcher(rec, max_batch=1, max_wait_ms=0)
        await b.start()
        try:
            first = asyncio.ensure_future(b.submit(["1"]))
            await asyncio.sleep(0.02)  # "1" runs
            gone = asyncio.ensure_future(b.submit(["2"]))
            await asyncio.sleep(0)
            gone.cancel()
            out = await b.submit(["3"])
            await first
            return out
        finally:
            await b.stop()

    assert run(main())["a"][:, 0].tolist() == [3.0]
    assert rec.sizes == [1, 1]  # "2" never ran
