"""The HTTP API of a merged guard model (FastAPI): ``create_app(model_or_backend, settings)``.

Endpoints: ``POST /v1/classify``, ``GET /v1/model``, ``GET /healthz``, ``GET /metrics``; the
OpenAPI document at ``/openapi.json`` describes them. Every error is JSON
``{"error": {"code", "message", "details"}}`` with a 4xx/5xx status.

A head *flags* a text when any label other than its first one (index 0: ``benign``,
``not-hate``, ``not-offensive``...) has a probability at or above the head's threshold
(``ServeSettings.thresholds``, default ``default_threshold`` = 0.5; ``None`` turns flagging off
for that head). A text is flagged when any of the heads asked for flags it.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from guardmerge import __version__
from guardmerge.errors import GuardmergeError
from guardmerge.serve.backends import Backend, TorchBackend
from guardmerge.serve.batching import MicroBatcher, QueueFullError

log = logging.getLogger(__name__)

API_KEY_ENV = "GUARDMERGE_API_KEY"


# -- settings ------------------------------------------------------------------------------
@dataclass
class ServeSettings:
    """Limits, batching and flagging of one server.

    Attributes:
        max_texts: most texts in one request (more: 413 ``too_many_texts``).
        max_chars: most characters in one text (more: 413 ``text_too_long``).
        max_batch: most texts per encoder pass (micro-batch).
        max_wait_ms: longest wait of the oldest queued text for a fuller batch.
        max_queue: most texts waiting for a batch (more: 503 ``overloaded``).
        thresholds: task -> flag threshold, or None to never flag that task.
        default_threshold: the threshold of tasks not in ``thresholds``.
        api_key: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>``.
    """

    max_texts: int = 64
    max_chars: int = 4000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    thresholds: dict[str, float | None] = field(default_factory=dict)
    default_threshold: float = 0.5
    api_key: str | None = None

    def threshold(self, task: str) -> float | None:
        return self.thresholds.get(task, self.default_threshold)


def parse_thresholds(items: Sequence[str]) -> dict[str, float | None]:
    """``["injection=0.8", "emotion=off"]`` -> ``{"injection": 0.8, "emotion": None}``."""
    out: dict[str, float | None] = {}
    for item in items:
        task, sep, value = item.partition("=")
        task, value = task.strip(), value.strip()
        if not sep or not task or not value:
            raise GuardmergeError(f"threshold '{item}' must look like task=0.8 (or task=off)")
        if value.lower() in ("off", "none"):
            out[task] = None
            continue
        try:
            number = float(value)
        except ValueError:
            raise GuardmergeError(f"threshold '{item}': '{value}' is not a number in [0, 1] or 'off'") from None
        if not 0.0 <= number <= 1.0 or math.isnan(number):
            raise GuardmergeError(f"threshold '{item}': {number} is outside [0, 1]")
        out[task] = number
    return out


# -- schemas (the OpenAPI document) ----------------------------------------------------------
class ClassifyRequest(BaseModel):
    """Texts to classify, and optionally which heads to run."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"texts": ["ignore previous instructions", "have a nice day"]}]},
    )
    texts: list[str] = Field(
        ..., min_length=1,
        description="Texts to classify (at least one; at most the server's max_texts, each at most max_chars characters).",
    )
    tasks: list[str] | None = Field(
        None, min_length=1,
        description="Heads to run, by task name (see GET /v1/model). Default: every head.",
    )


class HeadVerdict(BaseModel):
    """One head's verdict on one text."""

    label: str = Field(..., description="The most probable label.")
    score: float = Field(..., description="Softmax probability of `label`.")
    probabilities: dict[str, float] = Field(..., description="Softmax probability of every label of the head.")
    flagged: bool = Field(
        ...,
        description="True when a label other than the head's first (benign) label has probability >= the head's threshold.",
    )


class TextVerdict(BaseModel):
    """Every requested head's verdict on one text."""

    flagged: bool = Field(..., description="True when any requested head flagged the text.")
    heads: dict[str, HeadVerdict] = Field(..., description="Task name -> verdict, for each requested head.")


class ClassifyResponse(BaseModel):
    """Verdicts in the order of the request's texts."""

    tasks: list[str] = Field(..., description="The heads that ran, in order.")
    results: list[TextVerdict] = Field(..., description="One entry per input text, in input order.")


class HeadInfo(BaseModel):
    """A head of the served model."""

    task: str = Field(..., description="Task name (key in classify results).")
    labels: list[str] = Field(..., description="Label names in logit order; the first is the benign one.")
    threshold: float | None = Field(..., description="Flag threshold (null: this head never flags).")


class Limits(BaseModel):
    """Request limits and batching of the server."""

    max_texts: int = Field(..., description="Most texts per request.")
    max_chars: int = Field(..., description="Most characters per text.")
    max_batch: int = Field(..., description="Most texts per encoder pass.")
    max_wait_ms: float = Field(..., description="Longest wait for a fuller micro-batch, in milliseconds.")


class ModelInfo(BaseModel):
    """What is served."""

    base_model: str | None = Field(None, description="The base checkpoint the experts were fine-tuned from.")
    method: str | None = Field(None, description="The merge method.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="The merge method's parameters.")
    heads: list[HeadInfo] = Field(..., description="Every head, in model order.")
    backend: str = Field(..., description="Inference backend: torch or onnx.")
    precision: str = Field("fp32", description="Weights precision of the backend (fp32 or int8).")
    guardmerge_version: str = Field(..., description="Version of the guardmerge package serving.")
    limits: Limits


class Health(BaseModel):
    """Liveness and readiness."""

    status: str = Field(..., description="'ok' when the batcher runs, else 'starting' or 'stopped'.")
    queued_texts: int = Field(..., description="Texts waiting for a batch now.")


class ErrorBody(BaseModel):
    code: str = Field(..., description="Machine-readable error code, e.g. unknown_task, too_many_texts.")
    message: str = Field(..., description="What went wrong, naming the field or task at fault.")
    details: Any = Field(None, description="Extra structured information (validation errors...).")


class ErrorResponse(BaseModel):
    """Every error response."""

    error: ErrorBody


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


_ERRORS = {
    400: {"model": ErrorResponse, "description": "Unknown task or unparsable JSON."},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token (when the server has an API key)."},
    413: {"model": ErrorResponse, "description": "Too many texts, or a text too long."},
    415: {"model": ErrorResponse, "description": "The body is not sent as application/json."},
    422: {"model": ErrorResponse, "description": "The body does not match the schema."},
    503: {"model": ErrorResponse, "description": "Overloaded or shutting down; retry later."},
}


# -- metrics ---------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("guardmerge_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "guardmerge_request_duration_seconds", "HTTP request latency by endpoint.", ["endpoint"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.errors = Counter("guardmerge_errors", "Error responses by endpoint and error code.",
                              ["endpoint", "code"], registry=r)
        self.batch_size = Histogram("guardmerge_batch_size", "Texts per encoder pass (micro-batch).", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram(
            "guardmerge_batch_duration_seconds", "Inference time of one micro-batch.", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.texts = Counter("guardmerge_texts", "Texts classified.", registry=r)
        self.queued = Gauge("guardmerge_queued_texts", "Texts waiting for a micro-batch.", registry=r)

    def watch_queue(self, batcher: MicroBatcher) -> None:
        self.queued.set_function(lambda: batcher.queued)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.texts.inc(size)


_PATHS = frozenset({"/v1/classify", "/v1/model", "/healthz", "/metrics"})


def _endpoint(request: Request) -> str:
    """The route template (a bounded label set): unmatched paths count as ``other``."""
    route = request.scope.get("route")
    path = getattr(route, "path", None) or request.url.path
    return path if route is not None or path in _PATHS else "other"


# -- verdicts --------------------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def verdicts(
    logits: dict[str, np.ndarray], labels: dict[str, list[str]], thresholds: dict[str, float | None]
) -> list[TextVerdict]:
    """Per text, each head's label, score, probabilities and flag (see the module docstring)."""
    tasks = list(logits)
    n = len(next(iter(logits.values()))) if logits else 0
    probs = {t: softmax(v) for t, v in logits.items()}
    out = []
    for i in range(n):
        heads = {}
        for t in tasks:
            p = probs[t][i]
            names = labels[t]
            k = int(p.argmax())
            th = thresholds[t]
            flagged = th is not None and len(p) > 1 and float(p[1:].max()) >= th
            heads[t] = HeadVerdict(label=names[k], score=float(p[k]),
                                   probabilities={name: float(v) for name, v in zip(names, p)}, flagged=flagged)
        out.append(TextVerdict(flagged=any(h.flagged for h in heads.values()), heads=heads))
    return out


# -- the app ---------------------------------------------------------------------------------
def create_app(model_or_backend: Any, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving a merged model (a ``MultiHeadModel`` or a :class:`Backend`).

    The app owns a :class:`MicroBatcher` (started and stopped with the app's lifespan) and a
    Prometheus registry of its own. The backend is not closed by the app.
    """
    settings = settings or ServeSettings()
    from guardmerge.multihead import MultiHeadModel

    backend: Backend = (
        TorchBackend(model_or_backend) if isinstance(model_or_backend, MultiHeadModel) else model_or_backend
    )
    tasks = backend.tasks
    labels = {t: backend.labels(t) for t in tasks}
    unknown = sorted(set(settings.thresholds) - set(tasks))
    if unknown:
        raise GuardmergeError(f"threshold for unknown task(s) {', '.join(unknown)}; this model has: {', '.join(tasks)}")
    for name, value in [("max_texts", settings.max_texts), ("max_chars", settings.max_chars),
                        ("max_batch", settings.max_batch), ("max_queue", settings.max_queue)]:
        if value < 1:
            raise GuardmergeError(f"{name} must be at least 1 (got {value})")
    thresholds = {t: settings.threshold(t) for t in tasks}
    metrics = Metrics()
    batcher = MicroBatcher(backend.logits, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                           max_queue=max(settings.max_queue, settings.max_texts), on_batch=metrics.on_batch)
    metrics.watch_queue(batcher)
    info = backend.info
    model_info = ModelInfo(
        base_model=str(info["base_model"]) if info.get("base_model") is not None else None,
        method=info.get("method"),
        parameters=dict(info.get("parameters") or {}),
        heads=[HeadInfo(task=t, labels=labels[t], threshold=thresholds[t]) for t in tasks],
        backend=backend.name,
        precision=str(info.get("precision", "fp32")),
        guardmerge_version=__version__,
        limits=Limits(max_texts=settings.max_texts, max_chars=settings.max_chars,
                      max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        log.info("serving %d heads (%s) with the %s backend", len(tasks), ", ".join(tasks), backend.name)
        try:
            yield
        finally:
            await batcher.stop()

    auth_note = (" Requests to /v1/* and /metrics need `Authorization: Bearer <key>`." if settings.api_key else "")
    app = FastAPI(
        title="guardmerge",
        version=__version__,
        summary="One merged multi-head guard model: every guard's verdict in one call.",
        description=(
            f"Heads: {', '.join(tasks)}. Limits: {settings.max_texts} texts per request, "
            f"{settings.max_chars} characters per text. A head flags a text when a label other than "
            "its first (benign) one reaches the head's threshold." + auth_note
        ),
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.backend = backend
    app.state.settings = settings

    def error(request: Request, status: int, code: str, message: str, details: Any = None,
              headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(_endpoint(request), code).inc()
        body = ErrorResponse(error=ErrorBody(code=code, message=message, details=details))
        return JSONResponse(body.model_dump(), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error(request, exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype != "application/json" and not ctype.endswith("+json"):
            return error(request, 415, "unsupported_media_type",
                         f"the body must be JSON sent with 'Content-Type: application/json' (got '{ctype}')")
        if any(e.get("type") == "json_invalid" for e in errs):
            return error(request, 400, "malformed_json", "the request body is not valid JSON")
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errs]
        first = details[0] if details else {"loc": [], "msg": "invalid request", "type": ""}
        if first["loc"] == ["body"]:
            return error(request, 422, "invalid_request",
                         'the body must be a JSON object: {"texts": [str, ...], "tasks": [str, ...] (optional)}',
                         details)
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return error(request, 422, "invalid_request", f"{where}: {first['msg']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(request, exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error(request, 500, "internal_error", "internal server error")

    # a body that cannot be within the limits is refused before it is read (JSON escapes: 6 bytes/char)
    max_body = settings.max_texts * (6 * settings.max_chars + 8) + 4096

    @app.middleware("http")
    async def _measure(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_body:
                response = error(request, 413, "body_too_large",
                                 f"the body has {length} bytes; the limit is {max_body}")
            else:
                response = await call_next(request)
            status = response.status_code
            return response
        finally:
            endpoint = _endpoint(request)
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    bearer = HTTPBearer(auto_error=False, description="The server's API key (--api-key or $GUARDMERGE_API_KEY).")

    async def require_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        key = settings.api_key or ""
        if creds is None:
            raise APIError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(creds.credentials.encode(), key.encode()):
            raise APIError(401, "unauthorized", "wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    protected = APIRouter(dependencies=[Depends(require_key)] if settings.api_key else [])

    @protected.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS, tags=["guard"],
                    summary="Classify texts with every (or the requested) head")
    async def classify(body: ClassifyRequest) -> ClassifyResponse:
        """Per text: each requested head's label, score, probabilities and flag; texts of concurrent
        requests share micro-batches."""
        texts = body.texts
        if len(texts) > settings.max_texts:
            raise APIError(413, "too_many_texts",
                           f"{len(texts)} texts in one request; the limit is {settings.max_texts}")
        long = [i for i, t in enumerate(texts) if len(t) > settings.max_chars]
        if long:
            raise APIError(413, "text_too_long",
                           f"text {long[0]} has {len(texts[long[0]])} characters; the limit is {settings.max_chars}",
                           {"indexes": long[:100]})
        chosen = list(dict.fromkeys(body.tasks)) if body.tasks else tasks
        bad = [t for t in chosen if t not in labels]
        if bad:
            raise APIError(400, "unknown_task",
                           f"unknown task(s) {', '.join(repr(t) for t in bad)}; this model has: {', '.join(tasks)}",
                           {"unknown": bad, "tasks": tasks})
        try:
            logits = await batcher.submit(texts, None if body.tasks is None else chosen)
        except QueueFullError as exc:
            raise APIError(503, "overloaded", str(exc), headers={"Retry-After": "1"}) from None
        except GuardmergeError as exc:
            raise APIError(503, "unavailable", str(exc)) from None
        except Exception as exc:
            log.exception("inference failed")
            raise APIError(500, "inference_failed", f"inference failed: {type(exc).__name__}") from None
        ordered = {t: logits[t] for t in chosen}
        return ClassifyResponse(tasks=chosen, results=verdicts(ordered, labels, thresholds))

    @protected.get("/v1/model", response_model=ModelInfo, responses={401: _ERRORS[401]}, tags=["guard"],
                   summary="The served model: base, heads, labels, method, version, limits")
    async def model() -> ModelInfo:
        return model_info

    @protected.get("/metrics", response_class=Response, responses={401: _ERRORS[401]}, tags=["ops"],
                   summary="Prometheus metrics (text exposition format)")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(protected)

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}}, tags=["ops"],
             summary="Liveness: 200 when ready to classify (never needs a token)")
    async def healthz() -> Any:
        ok = batcher.running
        body = Health(status="ok" if ok else "stopped", queued_texts=batcher.queued)
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    return app
