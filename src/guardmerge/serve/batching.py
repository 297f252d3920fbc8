"""Dynamic micro-batching: concurrent requests share one encoder pass.

Each request's texts are queued (split into chunks of at most ``max_batch`` texts). One
collector task takes the oldest chunk, waits until either ``max_batch`` texts are queued or the
oldest chunk has waited ``max_wait_ms``, then takes chunks from the front of the queue while
they fit in ``max_batch`` texts and runs them as one batch in a single worker thread (so the
event loop stays free to accept requests). While a batch runs, new requests queue up, so under
load the next batch fills without waiting. Each request gets its own rows back, for the union
of the heads the batch's requests asked for, plus the per-text outputs named in ``shared``
(whether each text was truncated), which every request gets whatever heads it asked for.

Failures are isolated per request: when a batch of several requests fails, each of its
requests (chunks) is run again on its own, so only the requests that fail alone get the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from guardmerge.errors import GuardmergeError

log = logging.getLogger(__name__)

InferFn = Callable[[Sequence[str], Sequence[str] | None], dict[str, np.ndarray]]


class QueueFullError(GuardmergeError):
    """More texts are waiting than the batcher accepts (the server answers 503)."""


@dataclass
class _Chunk:
    texts: list[str]
    tasks: tuple[str, ...] | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


def check_batching(max_batch: int, max_wait_ms: float) -> None:
    """Refuse a batch size below 1 or a wait that is negative, NaN or infinite (any batcher's arguments)."""
    if max_batch < 1:
        raise GuardmergeError("max_batch must be at least 1")
    if not 0 <= max_wait_ms < math.inf:
        raise GuardmergeError(f"max_wait_ms must be a finite number >= 0 (got {max_wait_ms})")


class MicroBatcher:
    """Queue texts from concurrent callers and run them together.

    Args:
        infer: ``(texts, tasks or None) -> {task: logits [len(texts), C]}``; runs in a worker thread.
        max_batch: most texts per ``infer`` call.
        max_wait_ms: longest time the oldest queued text waits for others before its batch runs.
        max_queue: most texts waiting; beyond it :meth:`submit` raises :class:`QueueFullError`.
        on_batch: called (in the event loop) with the size and duration of each batch run.
        shared: output names (not heads) that every request gets its rows of, e.g. per-text flags.
        partial_failure: ``(output) -> bool``, True when a batch's output holds a failure that may be
            one request's fault (a head that failed); a batch of several requests is then run again
            one request at a time, like a batch that raised.
    """

    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
        on_batch: Callable[[int, float], None] | None = None,
        shared: Sequence[str] = (),
        partial_failure: Callable[[dict[str, np.ndarray]], bool] | None = None,
    ) -> None:
        check_batching(max_batch, max_wait_ms)
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.shared = tuple(shared)
        self.partial_failure = partial_failure
        self._queue: deque[_Chunk] = deque()
        self._queued_texts = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        """Texts waiting for a batch."""
        return self._queued_texts

    async def start(self) -> None:
        """Start the collector in the running event loop."""
        if self.running:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardmerge-infer")
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="guardmerge-batcher")

    async def stop(self) -> None:
        """Stop the collector; queued requests fail with an error."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            chunk = self._queue.popleft()
            if not chunk.future.done():
                chunk.future.set_exception(GuardmergeError("the server is shutting down"))
        self._queued_texts = 0
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Logits for ``texts`` (input order), computed together with concurrent callers."""
        if not self.running or self._wakeup is None:
            raise GuardmergeError("the batcher is not running")
        if not texts:
            raise GuardmergeError("no texts to classify")
        if self._queued_texts + len(texts) > self.max_queue:
            raise QueueFullError(f"{self._queued_texts} texts are queued (limit {self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        key = tuple(tasks) if tasks is not None else None
        chunks = []
        for start in range(0, len(texts), self.max_batch):
            chunk = _Chunk(list(texts[start : start + self.max_batch]), key, loop.create_future())
            chunks.append(chunk)
            self._queue.append(chunk)
            self._queued_texts += len(chunk.texts)
        self._wakeup.set()
        parts = await asyncio.gather(*(c.future for c in chunks))
        names = list(parts[0])
        return {t: np.concatenate([p[t] for p in parts]) for t in names}

    async def _collect(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._queue[0].enqueued + self.max_wait
            while self._queued_texts < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            await self._run(loop, batch)

    def _take(self) -> list[_Chunk]:
        batch: list[_Chunk] = []
        size = 0
        while self._queue and (not batch or size + len(self._queue[0].texts) <= self.max_batch):
            chunk = self._queue.popleft()
            self._queued_texts -= len(chunk.texts)
            if chunk.future.done():  # the caller went away
                continue
            batch.append(chunk)
            size += len(chunk.texts)
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Chunk]) -> None:
        """Run ``batch`` as one call; if it fails, run its chunks one by one so only the bad ones fail."""
        try:
            out = await self._infer(loop, batch)
        except asyncio.CancelledError:
            self._fail(batch, GuardmergeError("the server is shutting down"))
            raise
        except Exception as exc:
            if len(batch) == 1:
                log.warning(
                    "inference failed on a request of %d texts: %s: %s",
                    len(batch[0].texts),
                    type(exc).__name__,
                    exc,
                    exc_info=True,
                )
                self._fail(batch, exc)
                return
            log.warning(
                "inference failed on a batch of %d requests (%s: %s); retrying them one by one",
                len(batch),
                type(exc).__name__,
                exc,
            )
            await self._run_alone(loop, batch)
            return
        if len(batch) > 1 and self.partial_failure is not None and self.partial_failure(out):
            log.warning("a head failed on a batch of %d requests; retrying them one by one", len(batch))
            await self._run_alone(loop, batch)
            return
        self._route(batch, out)

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, batch: list[_Chunk]) -> None:
        try:
            for chunk in batch:
                if not chunk.future.done():  # else the caller went away meanwhile
                    await self._run(loop, [chunk])
        except asyncio.CancelledError:
            self._fail(batch, GuardmergeError("the server is shutting down"))
            raise

    async def _infer(self, loop: asyncio.AbstractEventLoop, batch: list[_Chunk]) -> dict[str, np.ndarray]:
        texts = [t for c in batch for t in c.texts]
        if any(c.tasks is None for c in batch):
            tasks = None
        else:
            tasks = list(dict.fromkeys(t for c in batch for t in c.tasks or ()))
        started = time.perf_counter()
        out = await loop.run_in_executor(self._executor, self.infer, texts, tasks)
        if self.on_batch is not None:
            self.on_batch(len(texts), time.perf_counter() - started)
        return out

    @staticmethod
    def _fail(batch: list[_Chunk], exc: BaseException) -> None:
        for c in batch:
            if not c.future.done():
                c.future.set_exception(exc)

    def _route(self, batch: list[_Chunk], out: dict[str, np.ndarray]) -> None:
        """Give each chunk its rows; a malformed output fails the chunks it cannot serve, not the collector."""
        start = 0
        for c in batch:
            n = len(c.texts)
            if not c.future.done():
                names = (*c.tasks, *(k for k in self.shared if k in out)) if c.tasks is not None else tuple(out)
                try:
                    rows = {t: out[t][start : start + n] for t in names}
                    if any(len(v) != n for v in rows.values()):
                        raise RuntimeError(f"the model returned too few rows for {n} texts")
                except Exception as exc:
                    c.future.set_exception(exc)
                else:
                    c.future.set_result(rows)
            start += n
