"""The HTTP API of a merged guard model (FastAPI): ``create_app(model_or_backend, settings)``.

Endpoints: ``POST /v1/classify``, ``GET /v1/model``, ``GET /healthz``, ``GET /metrics``
(:mod:`~guardmerge.serve.routes`); the OpenAPI document at ``/openapi.json`` describes them
(:mod:`~guardmerge.serve.schemas`). Every error is JSON ``{"error": {"code", "message", "details"}}``
with a 4xx/5xx status (:mod:`~guardmerge.serve.errors`). How heads flag texts:
:mod:`~guardmerge.serve.rules`; how a guard fails closed: :mod:`~guardmerge.serve.verdicts`.

With an API key, ``/openapi.json`` and ``/docs`` stay public (clients and tools read them without
the key) but name no head: the head names, like everything else about the model, are only
shown by ``GET /v1/model``, behind the key.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from guardmerge import __version__
from guardmerge.serve.backends import Backend, TorchBackend
from guardmerge.serve.batching import MicroBatcher
from guardmerge.serve.errors import add_error_handlers, error_factory
from guardmerge.serve.gate import RequestGate
from guardmerge.serve.inference import TRUNCATED, HeadRunner, HealthState, bad_weights
from guardmerge.serve.metrics import Metrics
from guardmerge.serve.routes import Service, add_routes, describe_model
from guardmerge.serve.rules import check_tasks, head_rules
from guardmerge.serve.settings import ServeSettings
from guardmerge.serve.v2 import add_v2_routes
from guardmerge.serve.verdicts import has_head_failure

log = logging.getLogger(__name__)

__all__ = ["create_app"]


def create_app(
    model_or_backend: Any, settings: ServeSettings | None = None, *, batcher_class: Callable[..., Any] | None = None
) -> FastAPI:
    """A FastAPI app serving a merged model (a ``MultiHeadModel`` or a :class:`Backend`).

    ``batcher_class`` builds the batcher with :class:`MicroBatcher`'s arguments and interface (default:
    :class:`MicroBatcher`; the Ray Serve integration passes one built on ``@serve.batch``).
    The app owns the batcher (started and stopped with the app's lifespan) and a
    Prometheus registry of its own. The backend is not closed by the app. The backend's
    ``bad_weights`` (found when it was built) make ``/v1/classify`` answer 503
    ``non_finite_weights`` and ``/healthz`` report it.
    """
    settings = settings or ServeSettings()
    from guardmerge.models.multihead import MultiHeadModel

    backend: Backend = (
        TorchBackend(model_or_backend) if isinstance(model_or_backend, MultiHeadModel) else model_or_backend
    )
    check_tasks(backend.tasks, settings)
    settings.validate()  # fields may have been changed since the settings were made
    rules = head_rules(backend, settings)
    metrics, health = Metrics(), HealthState()
    batcher: MicroBatcher = (batcher_class or MicroBatcher)(
        HeadRunner(backend, rules, settings.aggregation, health),
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        max_queue=max(settings.max_queue, settings.max_texts),
        on_batch=metrics.on_batch,
        shared=(TRUNCATED,),
        partial_failure=has_head_failure,
    )
    metrics.watch_queue(batcher)
    app = FastAPI(
        title="guardmerge",
        version=__version__,
        summary="One merged multi-head guard model: every guard's verdict in one call.",
        description=_description(settings, list(rules)),
        lifespan=_lifespan(backend, batcher, health),
    )
    app.state.batcher, app.state.metrics, app.state.backend = batcher, metrics, backend
    app.state.settings, app.state.health = settings, health
    error = error_factory(metrics)
    add_error_handlers(app, error)
    app.add_middleware(
        RequestGate,
        error=error,
        on_done=metrics.on_request,
        api_key=settings.api_key,
        protected=("/v1/", "/metrics", "/v2/models/"),
        json_routes={("POST", "/v1/classify")},
        read_routes=("/v2/models/",),
        # a body that cannot be within the limits is refused (JSON escapes: 6 bytes/char), while it streams
        max_body=settings.max_texts * (6 * settings.max_chars + 8) + 4096,
        body_timeout=settings.body_timeout,
    )
    model_info = describe_model(backend, rules, settings)
    service = Service(settings, rules, batcher, metrics, health, model_info)
    add_routes(app, service)
    add_v2_routes(app, service)  # the Open Inference Protocol (KServe v2) over the same service
    return app


def _description(settings: ServeSettings, tasks: list[str]) -> str:
    """The OpenAPI document's description: public behind a key, so it names no head then."""
    if settings.api_key:  # GET /v1/model shows the heads, with the key
        heads_note = "Heads: see GET /v1/model."
        auth_note = " Requests to /v1/* and /metrics need `Authorization: Bearer <key>`."
    else:
        heads_note, auth_note = f"Heads: {', '.join(tasks)}.", ""
    return (
        f"{heads_note} Limits: {settings.max_texts} texts per request, "
        f"{settings.max_chars} characters per text. A head flags a text when a label other than "
        "its benign ones reaches the head's threshold." + auth_note
    )


def _lifespan(
    backend: Backend, batcher: MicroBatcher, health: HealthState
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Check the weights and start the batcher with the app; stop it after."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        health.bad_weights = bad_weights(backend)
        if health.bad_weights:
            log.error(
                "the model's weights hold NaN or infinity in %d tensor(s) (%s): /healthz reports 503 and "
                "classifications are refused with 503 non_finite_weights",
                len(health.bad_weights),
                ", ".join(health.bad_weights[:5]),
            )
        await batcher.start()
        tasks = backend.tasks
        log.info("serving %d heads (%s) with the %s backend", len(tasks), ", ".join(tasks), backend.name)
        try:
            yield
        finally:
            await batcher.stop()

    return lifespan
