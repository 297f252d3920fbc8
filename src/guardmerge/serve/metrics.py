"""The Prometheus metrics of one app (``GET /metrics``): requests, latency, errors, batches, queue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import Scope

if TYPE_CHECKING:
    from guardmerge.serve.batching import MicroBatcher

__all__ = ["PATHS", "Metrics", "endpoint"]

PATHS = frozenset({"/v1/classify", "/v1/model", "/healthz", "/metrics"})
"""The API's paths: the ``endpoint`` labels besides ``other``."""


def endpoint(scope: Scope) -> str:
    """The route template (a bounded label set): unmatched paths count as ``other``."""
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("path", "")
    return path if route is not None or path in PATHS else "other"


class Metrics:
    """Prometheus metrics in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "guardmerge_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "guardmerge_request_duration_seconds",
            "HTTP request latency by endpoint.",
            ["endpoint"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.errors = Counter(
            "guardmerge_errors", "Error responses by endpoint and error code.", ["endpoint", "code"], registry=r
        )
        self.batch_size = Histogram(
            "guardmerge_batch_size",
            "Texts per encoder pass (micro-batch).",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.batch_seconds = Histogram(
            "guardmerge_batch_duration_seconds",
            "Inference time of one micro-batch.",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.head_errors = Counter(
            "guardmerge_head_errors",
            "Texts a head gave no verdict on (error verdicts in 200 responses), by task and error code.",
            ["task", "code"],
            registry=r,
        )
        self.texts = Counter("guardmerge_texts", "Texts classified.", registry=r)
        self.queued = Gauge("guardmerge_queued_texts", "Texts waiting for a micro-batch.", registry=r)

    def watch_queue(self, batcher: MicroBatcher) -> None:
        """Report ``batcher``'s queued texts as the queue gauge."""
        self.queued.set_function(lambda: batcher.queued)

    def on_batch(self, size: int, seconds: float) -> None:
        """Count a micro-batch (the batcher's ``on_batch``)."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.texts.inc(size)

    def on_request(self, scope: Scope, status: int, seconds: float) -> None:
        """Count a finished request (the gate's ``on_done``)."""
        where = endpoint(scope)
        self.requests.labels(where, str(status)).inc()
        self.latency.labels(where).observe(seconds)

    def on_error(self, scope: Scope, code: str) -> None:
        """Count an error response."""
        self.errors.labels(endpoint(scope), code).inc()
