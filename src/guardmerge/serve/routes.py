"""The endpoints: ``POST /v1/classify``, ``GET /v1/model``, ``GET /metrics`` (behind the API key, when the
server has one) and ``GET /healthz`` (never behind it), over one :class:`Service`.

Only when every requested head fails does a classification fail (500 ``inference_failed``); a model
whose weights hold NaN or infinity never answers (503 ``non_finite_weights``); inference not finished
within ``inference_timeout`` is 504 ``inference_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from guardmerge import __version__
from guardmerge.errors import GuardmergeError, NonFiniteWeightsError
from guardmerge.serve.backends import Backend
from guardmerge.serve.batching import MicroBatcher, QueueFullError
from guardmerge.serve.errors import ERRORS, APIError
from guardmerge.serve.flags import normalise_texts
from guardmerge.serve.gate import bearer_problem
from guardmerge.serve.inference import TRUNCATED, HealthState
from guardmerge.serve.metrics import Metrics
from guardmerge.serve.rules import HeadRule, head_info
from guardmerge.serve.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    HeadErrorVerdict,
    Health,
    Limits,
    ModelInfo,
    TextVerdict,
)
from guardmerge.serve.settings import ServeSettings, public_model_name
from guardmerge.serve.verdicts import verdicts

log = logging.getLogger(__name__)

__all__ = ["Service", "add_routes", "describe_model", "run_inference"]


@dataclass(frozen=True)
class Service:
    """What the endpoints of one app use."""

    settings: ServeSettings
    rules: dict[str, HeadRule]
    batcher: MicroBatcher
    metrics: Metrics
    health: HealthState
    model_info: ModelInfo

    @property
    def tasks(self) -> list[str]:
        """The heads, in model order."""
        return list(self.rules)


def describe_model(backend: Backend, rules: dict[str, HeadRule], settings: ServeSettings) -> ModelInfo:
    """What ``GET /v1/model`` shows: base model (its public name), method, heads, backend, limits."""
    info = backend.info
    return ModelInfo(
        base_model=public_model_name(str(info["base_model"])) if info.get("base_model") is not None else None,
        method=info.get("method"),
        parameters=dict(info.get("parameters") or {}),
        heads=[head_info(t, rule, settings.aggregation) for t, rule in rules.items()],
        backend=backend.name,
        precision=str(info.get("precision", "fp32")),
        guardmerge_version=__version__,
        limits=Limits(
            max_texts=settings.max_texts,
            max_chars=settings.max_chars,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
        ),
    )


def add_routes(app: FastAPI, service: Service) -> None:
    """Classify, model and metrics (needing the key when the server has one), then healthz."""
    key = service.settings.api_key
    protected = APIRouter(dependencies=[Depends(_key_check(key))] if key else [])
    protected.add_api_route(
        "/v1/classify",
        _classify_endpoint(service),
        methods=["POST"],
        response_model=ClassifyResponse,
        responses=ERRORS,
        tags=["guard"],
        summary="Classify texts with every (or the requested) head",
    )
    protected.add_api_route(
        "/v1/model",
        _model_endpoint(service.model_info),
        methods=["GET"],
        response_model=ModelInfo,
        responses={401: ERRORS[401]},
        tags=["guard"],
        summary="The served model: base, heads, labels, method, version, limits",
    )
    protected.add_api_route(
        "/metrics",
        _metrics_endpoint(service.metrics),
        methods=["GET"],
        response_class=Response,
        responses={401: ERRORS[401]},
        tags=["ops"],
        summary="Prometheus metrics (text exposition format)",
    )
    app.include_router(protected)
    app.add_api_route(
        "/healthz",
        _healthz_endpoint(service),
        methods=["GET"],
        response_model=Health,
        response_model_exclude_none=True,
        responses={503: {"model": Health}},
        tags=["ops"],
        summary="Readiness: 200 when ready to classify (never needs a token)",
    )


def _key_check(key: str) -> Callable[..., Awaitable[None]]:
    bearer = HTTPBearer(auto_error=False, description="The server's API key (--api-key or $GUARDMERGE_API_KEY).")

    async def require_key(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        """Documents the bearer scheme in OpenAPI; the gate has already checked the key."""
        problem = bearer_problem(request.headers.get("authorization"), key)
        if problem is not None:
            raise APIError(401, "unauthorized", problem, headers={"WWW-Authenticate": "Bearer"})

    return require_key


def _classify_endpoint(service: Service) -> Callable[[ClassifyRequest], Awaitable[ClassifyResponse]]:
    async def classify(body: ClassifyRequest) -> ClassifyResponse:
        """Per text: each requested head's label, score, probabilities and flag; texts of concurrent
        requests share micro-batches. Texts are normalised to Unicode NFC first."""
        texts = _request_texts(body.texts, service.settings)
        chosen = _request_tasks(body.tasks, service.tasks)
        if service.health.bad_weights:
            raise APIError(503, "non_finite_weights", str(NonFiniteWeightsError(service.health.bad_weights)))
        logits = await run_inference(service, texts, None if body.tasks is None else chosen)
        results = verdicts({t: logits[t] for t in chosen}, service.rules, logits.get(TRUNCATED))
        _count_head_errors(results, service.metrics)
        return ClassifyResponse(tasks=chosen, results=results)

    return classify


def _request_texts(texts: list[str], settings: ServeSettings) -> list[str]:
    """The texts in NFC, or an :class:`APIError` for too many, too long or invalid ones."""
    if len(texts) > settings.max_texts:
        raise APIError(413, "too_many_texts", f"{len(texts)} texts in one request; the limit is {settings.max_texts}")
    long = [i for i, t in enumerate(texts) if len(t) > settings.max_chars]
    if long:
        raise APIError(
            413,
            "text_too_long",
            f"text {long[0]} has {len(texts[long[0]])} characters; the limit is {settings.max_chars}",
            {"indexes": long[:100]},
        )
    normal, invalid = normalise_texts(texts)
    if invalid:
        raise APIError(422, "invalid_text", str(invalid[0]), {"indexes": [e.index for e in invalid[:100]]})
    return normal


def _request_tasks(asked: list[str] | None, tasks: list[str]) -> list[str]:
    """The heads to run (each once, in the order asked; default: all), or 400 ``unknown_task``."""
    chosen = list(dict.fromkeys(asked)) if asked else tasks
    bad = [t for t in chosen if t not in tasks]
    if bad:
        raise APIError(
            400,
            "unknown_task",
            f"unknown task(s) {', '.join(repr(t) for t in bad)}; this model has: {', '.join(tasks)}",
            {"unknown": bad, "tasks": tasks},
        )
    return chosen


def _count_head_errors(results: list[TextVerdict], metrics: Metrics) -> None:
    failed = 0
    for row in results:
        errors = [(t, h.error.code) for t, h in row.heads.items() if isinstance(h, HeadErrorVerdict)]
        failed += bool(errors)
        for task, code in errors:
            metrics.head_errors.labels(task, code).inc()
    if failed:
        log.error("%d of %d texts have heads without a verdict (error verdicts, flagged)", failed, len(results))


async def run_inference(service: Service, texts: list[str], chosen: list[str] | None) -> dict[str, np.ndarray]:
    """The batcher's output for ``texts`` within the inference timeout, or an :class:`APIError`."""
    timeout = service.settings.inference_timeout
    job = asyncio.ensure_future(service.batcher.submit(texts, chosen))
    try:
        done, _ = await asyncio.wait({job}, timeout=timeout)
    finally:
        if not job.done():
            job.cancel()
    if not done:
        log.error("inference of %d texts did not finish within %g s", len(texts), timeout)
        raise APIError(
            504,
            "inference_timeout",
            f"the texts were not classified within {timeout:g} s (--inference-timeout); no verdict is given",
        )
    try:
        return job.result()
    except QueueFullError as exc:
        raise APIError(503, "overloaded", str(exc), headers={"Retry-After": "1"}) from None
    except NonFiniteWeightsError as exc:
        raise APIError(503, "non_finite_weights", str(exc)) from None
    except GuardmergeError as exc:
        raise APIError(503, "unavailable", str(exc)) from None
    except Exception as exc:
        log.error("inference failed: %s: %s", type(exc).__name__, exc)
        raise APIError(500, "inference_failed", f"inference failed: {type(exc).__name__}") from None


def _model_endpoint(info: ModelInfo) -> Callable[[], Awaitable[ModelInfo]]:
    async def model() -> ModelInfo:
        return info

    return model


def _metrics_endpoint(metrics: Metrics) -> Callable[[], Awaitable[Response]]:
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return prometheus


def _healthz_endpoint(service: Service) -> Callable[[], Awaitable[Any]]:
    batcher, health = service.batcher, service.health

    async def healthz() -> Any:
        if not batcher.running:
            status, reason = "stopped", "the batcher is not running"
        elif health.bad_weights:
            status = "non_finite_weights"
            reason = f"the model's weights hold NaN or infinity in {len(health.bad_weights)} tensor(s): " + ", ".join(
                health.bad_weights[:5]
            )
        elif not health.last_output_finite:
            status, reason = "non_finite_output", "the last inference produced NaN or infinite scores"
        else:
            return Health(status="ok", queued_texts=batcher.queued)
        body = Health(status=status, queued_texts=batcher.queued, reason=reason)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)

    return healthz
