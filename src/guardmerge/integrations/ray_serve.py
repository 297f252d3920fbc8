"""Scale the guard out on Ray Serve: the same HTTP API, on as many replicas as Ray gives it.

    pip install 'guardmerge[ray-serve]'

:func:`deployment` builds a Ray Serve application whose every replica loads the merged model
(torch, or an ONNX export) and answers exactly what ``guardmerge serve`` answers: the app of
:func:`guardmerge.serve.create_app` (``/v1/classify``, ``/v1/model``, ``/healthz``, ``/metrics``
and the KServe v2 routes, with their auth, limits, error codes and fail-closed verdicts) runs in
the replica, and Ray Serve's proxy hands it each request. Batching is Ray Serve's own
``@serve.batch`` (:class:`RayBatcher`): each text is one batch item, so concurrent requests share
encoder passes of up to ``max_batch`` texts, and a batch that fails is run again text by text,
so only the request at fault fails. Replicas are ``replicas`` or Ray Serve's autoscaling bounds.
A replica that dies mid-request gives an error status from Ray Serve's proxy, never a verdict.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guardmerge.errors import GuardmergeError
from guardmerge.serve.batching import QueueFullError, check_batching
from guardmerge.serve.settings import ServeSettings

log = logging.getLogger(__name__)

__all__ = ["GuardReplica", "RayBatcher", "deployment", "run"]

HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})
"""Headers that belong to one HTTP hop, not forwarded between Ray's proxy and the replica's app."""


def _serve() -> Any:
    try:
        from ray import serve
    except ImportError as exc:
        raise GuardmergeError(
            f"the Ray Serve integration needs ray[serve] ({exc}): pip install 'guardmerge[ray-serve]'"
        ) from None
    return serve


@dataclass(frozen=True)
class _Failed:
    """One batch item's failure, handed back to its caller (Ray's batch returns one value per item)."""

    error: BaseException


class RayBatcher:
    """:class:`~guardmerge.serve.batching.MicroBatcher`'s interface and failure rules over Ray Serve's
    ``@serve.batch``: each text is one item, ``max_batch`` items per encoder pass, the first item
    waiting at most ``max_wait_ms``. Arguments as :class:`MicroBatcher`'s."""

    def __init__(
        self,
        infer: Callable[[Sequence[str], Sequence[str] | None], dict[str, np.ndarray]],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
        on_batch: Callable[[int, float], None] | None = None,
        shared: Sequence[str] = (),
        partial_failure: Callable[[dict[str, np.ndarray]], bool] | None = None,
    ) -> None:
        check_batching(max_batch, max_wait_ms)
        self.infer, self.max_queue, self.on_batch = infer, max_queue, on_batch
        self.shared, self.partial_failure = tuple(shared), partial_failure
        self._batched = _serve().batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000.0)(self._run)
        self._executor: ThreadPoolExecutor | None = None
        self._queued = 0

    @property
    def running(self) -> bool:
        return self._executor is not None

    @property
    def queued(self) -> int:
        """Texts waiting for or in a batch."""
        return self._queued

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardmerge-infer")

    async def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Logits for ``texts`` (input order), each text batched with concurrent callers' texts."""
        if not self.running:
            raise GuardmergeError("the batcher is not running")
        if not texts:
            raise GuardmergeError("no texts to classify")
        if self._queued + len(texts) > self.max_queue:
            raise QueueFullError(f"{self._queued} texts are queued (limit {self.max_queue}); retry later")
        key = tuple(tasks) if tasks is not None else None
        self._queued += len(texts)
        try:
            rows = await asyncio.gather(*(self._batched((text, key)) for text in texts))
        finally:
            self._queued -= len(texts)
        for row in rows:
            if isinstance(row, _Failed):
                raise row.error
        return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}

    async def _run(self, items: list[tuple[str, tuple[str, ...] | None]]) -> list[dict[str, np.ndarray] | _Failed]:
        """One encoder pass over every item's text; on a failure that may be one text's fault,
        each item again on its own."""
        try:
            out = await self._infer(items)
        except Exception as exc:
            if len(items) == 1:
                log.warning("inference failed on a text: %s: %s", type(exc).__name__, exc)
                return [_Failed(exc)]
            log.warning("inference failed on a batch of %d texts (%s); retrying them one by one", len(items), exc)
            return [row for item in items for row in await self._run([item])]
        if len(items) > 1 and self.partial_failure is not None and self.partial_failure(out):
            return [row for item in items for row in await self._run([item])]
        return [self._rows(out, i, key) for i, (_, key) in enumerate(items)]

    async def _infer(self, items: list[tuple[str, tuple[str, ...] | None]]) -> dict[str, np.ndarray]:
        texts = [text for text, _ in items]
        keys = [key for _, key in items]
        tasks = None if any(k is None for k in keys) else list(dict.fromkeys(t for k in keys for t in k or ()))
        loop = asyncio.get_running_loop()
        started = loop.time()
        out = await loop.run_in_executor(self._executor, self.infer, texts, tasks)
        if self.on_batch is not None:
            self.on_batch(len(texts), loop.time() - started)
        return out

    def _rows(
        self, out: Mapping[str, np.ndarray], i: int, key: tuple[str, ...] | None
    ) -> dict[str, np.ndarray] | _Failed:
        names = (*key, *(k for k in self.shared if k in out)) if key is not None else tuple(out)
        try:
            rows = {name: out[name][i : i + 1] for name in names}
        except Exception as exc:
            return _Failed(exc)
        if any(len(v) != 1 for v in rows.values()):
            return _Failed(RuntimeError("the model returned too few rows"))
        return rows


class GuardReplica:
    """One Ray Serve replica: the merged model and the ``guardmerge serve`` app around it, batching
    with :class:`RayBatcher`; Ray's proxy hands it every HTTP request under the route prefix."""

    def __init__(
        self,
        model: str,
        backend: str = "torch",
        settings: ServeSettings | None = None,
        threads: int | None = None,
        max_length: int | None = None,
    ) -> None:
        import httpx

        from guardmerge.serve.app import create_app
        from guardmerge.serve.backends import load_backend

        self.backend = load_backend(model, backend, max_length=max_length, threads=threads)
        self.app = create_app(self.backend, settings or ServeSettings(), batcher_class=RayBatcher)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://replica")
        self._lifespan: Any = None

    async def __call__(self, request: Any) -> Any:
        """The app's answer to ``request`` (a Starlette request from Ray Serve's proxy)."""
        from starlette.responses import Response

        if self._lifespan is None:  # the app's start-up: the weight check, the batcher
            self._lifespan = self.app.router.lifespan_context(self.app)
            await self._lifespan.__aenter__()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        answer = await self.client.request(
            request.method,
            request.url.path,
            params=list(request.query_params.multi_items()),
            headers=headers,
            content=await request.body(),
        )
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    def __del__(self) -> None:
        self.backend.close()


def deployment(
    model: str | Path,
    *,
    backend: str = "torch",
    settings: ServeSettings | None = None,
    replicas: int = 1,
    autoscaling: Mapping[str, Any] | None = None,
    threads: int | None = None,
    max_length: int | None = None,
    name: str = "guardmerge",
    cpus_per_replica: float = 1.0,
) -> Any:
    """A Ray Serve application serving ``model`` on ``replicas`` replicas (or, with
    ``autoscaling``, Ray Serve's ``autoscaling_config``: ``min_replicas``, ``max_replicas``...).

    Raises:
        GuardmergeError: ray[serve] missing, a folder that does not exist, or bad settings.
    """
    serve = _serve()
    folder = Path(model)
    if not folder.is_dir():
        raise GuardmergeError(f"model folder '{folder}' does not exist")
    if replicas < 1 and autoscaling is None:
        raise GuardmergeError(f"replicas must be at least 1 (got {replicas})")
    settings = settings or ServeSettings()
    settings.validate()
    options: dict[str, Any] = {"name": name, "ray_actor_options": {"num_cpus": cpus_per_replica}}
    options["max_ongoing_requests"] = max(settings.max_queue, 1)
    if autoscaling is not None:
        options["autoscaling_config"] = dict(autoscaling)
    else:
        options["num_replicas"] = replicas
    replica = serve.deployment(**options)(GuardReplica)
    return replica.bind(str(folder.resolve()), backend, settings, threads, max_length)


def run(
    app: Any, *, address: str | None = None, host: str = "127.0.0.1", port: int = 8000, name: str = "guardmerge"
) -> Any:
    """Connect to (or start, when ``address`` is None) a Ray cluster, serve ``app`` on
    ``host:port`` under ``/``, and return its handle once every replica is up."""
    import ray

    serve = _serve()
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=name, route_prefix="/")
