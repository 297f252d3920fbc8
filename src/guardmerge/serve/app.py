"""The HTTP API of a merged guard model (FastAPI): ``create_app(model_or_backend, settings)``.

Endpoints: ``POST /v1/classify``, ``GET /v1/model``, ``GET /healthz``, ``GET /metrics``; the
OpenAPI document at ``/openapi.json`` describes them. Every error is JSON
``{"error": {"code", "message", "details"}}`` with a 4xx/5xx status.

A sequence head *flags* a text when any of its non-benign labels has a probability (softmax;
a sigmoid per label for a multi-label head) at or above its threshold (``ServeSettings.thresholds``:
``task`` or ``task.label``, default ``default_threshold`` = 0.5; ``None`` turns flagging off). Benign
labels come from ``ServeSettings.benign``, else the head's stored ones, else a logged guess from
the names that never silences a label (see :mod:`guardmerge.serve.flags`); a token head flags a
text that contains an entity of a flagged type (``ServeSettings.flag_entities``, default any
entity). A text is flagged when any of the heads asked for flags it.

Single-label heads answer ``{label, score, probabilities, flagged}``; multi-label heads
``{probabilities, labels, flagged}`` (``labels``: those at or above their thresholds); token heads
``{entities: [{label, start, end, text, score}], flagged}``. Each text's result also says whether
the tokenizer cut it at the token limit (``truncated``: its tail was not seen).

A guard fails closed. One head's failure is reported per head and the others still answer: a
head whose scores for a text are NaN or infinite, or that raised, gives that text
``{"error": {"code", "message"}, "flagged": true}`` (``non_finite_output`` or ``inference_failed``),
and the text is flagged. Only when every head fails does the request fail (500
``inference_failed``); a model whose weights hold NaN or infinity never answers (503
``non_finite_weights``); inference not finished within ``inference_timeout`` is 504
``inference_timeout``. No failure ever gives a benign verdict.

With an API key, ``/openapi.json`` and ``/docs`` stay public (clients and tools read them without
the key) but name no head: the head names, like everything else about the model, are only
shown by ``GET /v1/model``, behind the key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Literal

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
from starlette.types import Scope

from guardmerge import __version__
from guardmerge.errors import GuardmergeError, NonFiniteWeightsError
from guardmerge.outputs import AGGREGATIONS, entity_spans, entity_types, token_rows
from guardmerge.serve.backends import Backend, TorchBackend
from guardmerge.serve.batching import MicroBatcher, QueueFullError
from guardmerge.serve.flags import (
    entity_flag,
    label_flag,
    normalise_texts,
    parse_label_lists,
    parse_thresholds,
    resolve_benign,
    sigmoid,
    softmax,
)
from guardmerge.serve.gate import RequestGate, bearer_problem

log = logging.getLogger(__name__)

__all__ = ["ServeSettings", "create_app", "parse_label_lists", "parse_thresholds"]

API_KEY_ENV = "GUARDMERGE_API_KEY"

SETTING_RANGES: dict[str, tuple[int, int]] = {
    "max_texts": (1, 10_000),
    "max_chars": (1, 1_000_000),
    "max_batch": (1, 1024),
    "max_queue": (1, 1_000_000),
}
"""The integer limits a server accepts (inclusive)."""
MAX_WAIT_MS = 10_000.0
MAX_TIMEOUT_S = 3600.0
TRUNCATED = "\x00truncated"
"""The batcher output carrying each text's truncation flag (not a head: no task name holds NUL)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_seconds(name: str, value: float, flag: str | None = None) -> None:
    """Refuse a timeout that is not a finite number of seconds in (0, :data:`MAX_TIMEOUT_S`]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT_S:
        raise GuardmergeError(
            f"{name} ({flag or _flag(name)}) must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g} (got {value!r})"
        )


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
        thresholds: ``task`` or ``task.label`` -> flag threshold, or None to never flag that
            task (label); a label's own entry wins over its task's.
        default_threshold: the threshold of tasks not in ``thresholds``.
        benign: sequence task -> its benign labels (default: the head's stored ones, else
            :func:`~guardmerge.serve.flags.resolve_benign`'s guess).
        flag_entities: token task -> the entity types that flag a text (default: any).
        aggregation: how token heads group word pieces into entities (``first`` or ``simple``).
        api_key: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>``
            (checked before the body is read); an empty or blank key is an error.
        body_timeout: seconds within which a request's whole body must arrive (else 408).
        inference_timeout: seconds within which a request's texts must be classified, from the moment
            they are queued (else 504 ``inference_timeout``, never a verdict).

    Every field is checked when the settings are made (and again by :func:`create_app`): limits
    have upper bounds (:data:`SETTING_RANGES`, ``max_wait_ms`` <= 10000, timeouts <= 3600 s), and
    NaN or infinite numbers are refused.
    """

    max_texts: int = 64
    max_chars: int = 4000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    thresholds: dict[str, float | None] = field(default_factory=dict)
    default_threshold: float = 0.5
    api_key: str | None = None
    body_timeout: float = 30.0
    benign: dict[str, list[str]] = field(default_factory=dict)
    flag_entities: dict[str, list[str]] = field(default_factory=dict)
    aggregation: str = "first"
    inference_timeout: float = 30.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`GuardmergeError` (naming the field and its flag) for a value out of range."""
        for name, (low, high) in SETTING_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise GuardmergeError(f"{name} ({_flag(name)}) must be an integer from {low} to {high} (got {value!r})")
        wait = self.max_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_WAIT_MS:
            raise GuardmergeError(
                f"max_wait_ms (--max-wait-ms) must be a number from 0 to {MAX_WAIT_MS:g} (got {wait!r})"
            )
        check_seconds("body_timeout", self.body_timeout)
        check_seconds("inference_timeout", self.inference_timeout)
        if not (isinstance(self.default_threshold, (int, float)) and 0.0 <= self.default_threshold <= 1.0):
            raise GuardmergeError(
                f"default_threshold (--default-threshold) {self.default_threshold!r} is outside [0, 1]"
            )
        for key, value in self.thresholds.items():
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise GuardmergeError(f"threshold '{key}' (--threshold) {value!r} is outside [0, 1]")
        check_api_key(self.api_key, "the API key (api_key)")

    def threshold(self, task: str) -> float | None:
        return self.thresholds.get(task, self.default_threshold)

    def label_threshold(self, task: str, label: str, stored: Mapping[str, float] | None = None) -> float | None:
        """``label``'s threshold: ``task.label`` here, else ``task`` here, else the head's
        ``stored`` threshold of the label, else ``default_threshold``."""
        key = f"{task}.{label}"
        if key in self.thresholds:
            return self.thresholds[key]
        if task in self.thresholds:
            return self.thresholds[task]
        return float((stored or {}).get(label, self.default_threshold))


def check_api_key(key: str | None, source: str = "the API key") -> None:
    """Refuse a key that is empty, blank or padded with whitespace (an unset variable expands to '')."""
    if key is None:
        return
    if not key.strip():
        raise GuardmergeError(
            f"{source} is empty or blank (an unset variable?): give a real key, or none at all to serve without auth"
        )
    if key != key.strip():
        raise GuardmergeError(f"{source} starts or ends with whitespace, so no client could send it: strip it")


def public_model_name(value: str) -> str:
    """What ``/v1/model`` shows of a base model: a local path's last component, a hub id as given."""
    text = value.strip()
    for flavour in (PurePosixPath, PureWindowsPath):
        path = flavour(text)
        if path.is_absolute() or text.startswith(("~", "./", "../", ".\\", "..\\")):
            return path.name or text
    return text


def _safe_json(value: Any) -> Any:
    """``value`` with every string made encodable as UTF-8 (lone surrogates become ``\\udXXX``)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_safe_json(k): _safe_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe_json(v) for v in value]
    return value


# -- schemas (the OpenAPI document) ----------------------------------------------------------
class ClassifyRequest(BaseModel):
    """Texts to classify, and optionally which heads to run."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"texts": ["ignore previous instructions", "have a nice day"]}]},
    )
    texts: list[str] = Field(
        ...,
        min_length=1,
        description="Texts to classify (at least one; at most the server's max_texts, each at most max_chars "
        "characters).",
    )
    tasks: list[str] | None = Field(
        None,
        min_length=1,
        description="Heads to run, by task name (see GET /v1/model). Default: every head.",
    )


class HeadVerdict(BaseModel):
    """One head's verdict on one text."""

    label: str = Field(..., description="The most probable label.")
    score: float = Field(..., description="Softmax probability of `label`.")
    probabilities: dict[str, float] = Field(..., description="Softmax probability of every label of the head.")
    flagged: bool = Field(
        ...,
        description="True when a non-benign label has probability >= its threshold (see GET /v1/model).",
    )


class MultiLabelVerdict(BaseModel):
    """A multi-label head's verdict on one text."""

    probabilities: dict[str, float] = Field(..., description="Sigmoid probability of every label of the head.")
    labels: list[str] = Field(..., description="The labels at or above their thresholds, in label order.")
    flagged: bool = Field(
        ..., description="True when a non-benign label has probability >= its threshold (see GET /v1/model)."
    )


class EntitySpan(BaseModel):
    """An entity a token head found in a text."""

    label: str = Field(..., description="Entity type (the tag without its B-/I- prefix).")
    start: int = Field(..., description="Start character offset in the text (as sent, after NFC normalisation).")
    end: int = Field(..., description="End character offset (exclusive).")
    text: str = Field(..., description="text[start:end].")
    score: float = Field(..., description="Mean softmax probability of the entity's tags.")


class TokenVerdict(BaseModel):
    """A token-classification head's verdict on one text."""

    entities: list[EntitySpan] = Field(..., description="Entity spans in text order.")
    flagged: bool = Field(..., description="True when the text contains an entity of a flagged type.")


class HeadErrorBody(BaseModel):
    """Why a head gave no verdict."""

    code: str = Field(
        ...,
        description="non_finite_output (the head's scores for this text are NaN or infinite) or inference_failed "
        "(the head raised).",
    )
    message: str = Field(..., description="What went wrong, naming the head.")


class HeadErrorVerdict(BaseModel):
    """A head that gave no verdict on this text. A guard fails closed: the head flags the text."""

    error: HeadErrorBody
    flagged: Literal[True] = Field(True, description="Always true: a head without a verdict flags the text.")


class TextVerdict(BaseModel):
    """Every requested head's verdict on one text."""

    flagged: bool = Field(
        ..., description="True when any requested head flagged the text, or gave no verdict (an error)."
    )
    truncated: bool = Field(
        ...,
        description="True when the text has more tokens than the model reads (max_length): the tokenizer cut it, "
        "and its tail was not classified. Split long texts to have all of them checked.",
    )
    heads: dict[str, MultiLabelVerdict | TokenVerdict | HeadVerdict | HeadErrorVerdict] = Field(
        ...,
        description="Task name -> verdict, for each requested head: {label, score, probabilities, flagged} for "
        "single-label heads, {probabilities, labels, flagged} for multi-label heads, {entities, flagged} for "
        "token-classification heads; {error: {code, message}, flagged: true} for a head that failed on this text "
        "(the others still answer).",
    )


class ClassifyResponse(BaseModel):
    """Verdicts in the order of the request's texts."""

    tasks: list[str] = Field(..., description="The heads that ran, in order.")
    results: list[TextVerdict] = Field(..., description="One entry per input text, in input order.")


class HeadInfo(BaseModel):
    """A head of the served model."""

    task: str = Field(..., description="Task name (key in classify results).")
    labels: list[str] = Field(..., description="Label names in logit order.")
    threshold: float | None = Field(..., description="Flag threshold (null: this head never flags).")
    benign: list[str] = Field(default_factory=list, description="Labels that never flag a text.")


class MultiLabelHeadInfo(HeadInfo):
    """A multi-label head of the served model."""

    problem: Literal["multi_label"] = Field("multi_label", description="A sigmoid per label.")
    label_thresholds: dict[str, float | None] = Field(..., description="Each label's flag threshold.")


class TokenHeadInfo(HeadInfo):
    """A token-classification head of the served model."""

    problem: Literal["token"] = Field("token", description="A softmax per token; entity spans per text.")
    entity_types: list[str] = Field(..., description="Entity types the head tags.")
    flag_entities: list[str] | None = Field(..., description="Types that flag a text (null: any entity).")
    aggregation: str = Field(..., description="How word pieces become entities: first or simple.")


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
    heads: list[MultiLabelHeadInfo | TokenHeadInfo | HeadInfo] = Field(..., description="Every head, in model order.")
    backend: str = Field(..., description="Inference backend: torch or onnx.")
    precision: str = Field("fp32", description="Weights precision of the backend (fp32 or int8).")
    guardmerge_version: str = Field(..., description="Version of the guardmerge package serving.")
    limits: Limits


class Health(BaseModel):
    """Liveness and readiness."""

    status: str = Field(
        ...,
        description="'ok' when ready to classify; else 'stopped', 'non_finite_weights' (the model's weights hold "
        "NaN or infinity) or 'non_finite_output' (the last inference produced NaN or infinite scores).",
    )
    queued_texts: int = Field(..., description="Texts waiting for a batch now.")
    reason: str | None = Field(None, description="Why the server is not ready (absent when ok).")


class ErrorBody(BaseModel):
    code: str = Field(..., description="Machine-readable error code, e.g. unknown_task, too_many_texts.")
    message: str = Field(..., description="What went wrong, naming the field or task at fault.")
    details: Any = Field(None, description="Extra structured information (validation errors...).")


class ErrorResponse(BaseModel):
    """Every error response."""

    error: ErrorBody


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "unknown_task, or malformed_json (the body is not valid JSON, or not UTF-8).",
    },
    401: {
        "model": ErrorResponse,
        "description": "unauthorized: missing or wrong bearer token (when the server has an API key).",
    },
    408: {"model": ErrorResponse, "description": "request_timeout: the body did not arrive within the body timeout."},
    413: {"model": ErrorResponse, "description": "too_many_texts, text_too_long or body_too_large."},
    415: {
        "model": ErrorResponse,
        "description": "unsupported_media_type: the body is not sent with Content-Type: application/json.",
    },
    422: {
        "model": ErrorResponse,
        "description": "invalid_request (the body does not match the schema) or invalid_text (a text is not "
        "valid Unicode, e.g. a lone surrogate; details.indexes names the texts).",
    },
    500: {
        "model": ErrorResponse,
        "description": "inference_failed: every requested head failed (no verdict is given). One head's failure, "
        "such as non_finite_output (NaN or infinite scores), is reported in that head's entry of a 200 response.",
    },
    503: {
        "model": ErrorResponse,
        "description": "overloaded (too many texts queued, or too many connections; retry later), unavailable "
        "(shutting down), or non_finite_weights (the model's weights hold NaN or infinity: it never answers).",
    },
    504: {
        "model": ErrorResponse,
        "description": "inference_timeout: the texts were not classified within the inference timeout; no "
        "verdict is given.",
    },
}


# -- metrics ---------------------------------------------------------------------------------
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
        self.queued.set_function(lambda: batcher.queued)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.texts.inc(size)


_PATHS = frozenset({"/v1/classify", "/v1/model", "/healthz", "/metrics"})


def _endpoint(scope: Scope) -> str:
    """The route template (a bounded label set): unmatched paths count as ``other``."""
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("path", "")
    return path if route is not None or path in _PATHS else "other"


# -- verdicts --------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadRule:
    """How one head answers and flags (built once per server from the settings).

    Attributes:
        problem: ``single_label``, ``multi_label`` or ``token``.
        labels: label names in logit order.
        threshold: the head's threshold (None: it never flags).
        label_thresholds: each label's threshold (sequence heads).
        benign: labels that never flag (sequence heads).
        entities: entity types that flag a text (token heads; None: any).
    """

    problem: str
    labels: tuple[str, ...]
    threshold: float | None
    label_thresholds: tuple[float | None, ...] = ()
    benign: frozenset[str] = frozenset()
    entities: frozenset[str] | None = None


def head_rules(backend: Backend, settings: ServeSettings) -> dict[str, HeadRule]:
    """Every head's :class:`HeadRule`; thresholds, benign labels and entity types that name an
    unknown task, label or type, or a head of the wrong kind, are errors."""
    tasks = backend.tasks
    problem_of = getattr(backend, "problem", None)
    stored_of = getattr(backend, "thresholds", None)
    benign_of = getattr(backend, "benign", None)
    problems = {t: str(problem_of(t)) if callable(problem_of) else "single_label" for t in tasks}
    labels = {t: list(backend.labels(t)) for t in tasks}
    have = ", ".join(tasks)
    for key in settings.thresholds:
        task, _, label = key.partition(".")
        if task not in labels:
            raise GuardmergeError(f"threshold for unknown task(s) {task}; this model has: {have}")
        if label and problems[task] == "token":
            raise GuardmergeError(f"threshold '{key}': token head '{task}' has no per-label thresholds")
        if label and label not in labels[task]:
            raise GuardmergeError(
                f"threshold '{key}': head '{task}' has no label '{label}'; its labels are {', '.join(labels[task])}"
            )
    for option, given, kinds in (
        ("--benign", settings.benign, ("single_label", "multi_label")),
        ("--flag-entities", settings.flag_entities, ("token",)),
    ):
        for task in given:
            if task not in labels:
                raise GuardmergeError(f"{option}: unknown task '{task}'; this model has: {have}")
            if problems[task] not in kinds:
                kind = " and ".join(k.replace("_", "-") for k in kinds)
                raise GuardmergeError(f"{option} {task}: applies to {kind} heads; '{task}' is {problems[task]}")
    if settings.aggregation not in AGGREGATIONS:
        raise GuardmergeError(f"unknown aggregation '{settings.aggregation}'; use one of {', '.join(AGGREGATIONS)}")
    rules = {}
    for t in tasks:
        names = labels[t]
        stored = stored_of(t) if callable(stored_of) else {}
        cuts = tuple(settings.label_threshold(t, n, stored) for n in names)
        benign: frozenset[str] = frozenset()
        if problems[t] != "token" and any(c is not None for c in cuts):  # a head that can flag
            told = settings.benign.get(t) if t in settings.benign else benign_of(t) if callable(benign_of) else None
            how = f"--benign {t}=LABEL[,LABEL...] (or --threshold {t}=off)"
            benign = resolve_benign(t, names, problems[t], told, how)
        if problems[t] == "multi_label":
            rules[t] = HeadRule("multi_label", tuple(names), settings.threshold(t), cuts, benign)
        elif problems[t] == "token":
            types = settings.flag_entities.get(t)
            unknown = sorted(set(types or ()) - set(entity_types(names)))
            if unknown:
                raise GuardmergeError(
                    f"--flag-entities {t}: unknown entity type(s) {', '.join(unknown)}; "
                    f"its types are {', '.join(entity_types(names))}"
                )
            rules[t] = HeadRule(
                "token", tuple(names), settings.threshold(t), entities=None if types is None else frozenset(types)
            )
        else:
            rules[t] = HeadRule("single_label", tuple(names), settings.threshold(t), cuts, benign)
    return rules


def head_info(task: str, rule: HeadRule, aggregation: str) -> HeadInfo:
    """What ``GET /v1/model`` shows of one head."""
    base = {
        "task": task,
        "labels": list(rule.labels),
        "threshold": rule.threshold,
        "benign": [n for n in rule.labels if n in rule.benign],
    }
    if rule.problem == "multi_label":
        return MultiLabelHeadInfo(**base, label_thresholds=dict(zip(rule.labels, rule.label_thresholds)))
    if rule.problem == "token":
        return TokenHeadInfo(
            **base,
            entity_types=entity_types(rule.labels),
            flag_entities=None if rule.entities is None else sorted(rule.entities),
            aggregation=aggregation,
        )
    return HeadInfo(**base)


@dataclass(frozen=True)
class HeadFailure:
    """A head that gave no output for a text: the row of an object array in the batcher's output."""

    code: str
    message: str


def failed_rows(n: int, code: str, message: str) -> np.ndarray:
    """``n`` rows of one :class:`HeadFailure` (an object array, routed like a head's logits)."""
    rows = np.empty(n, dtype=object)
    rows.fill(HeadFailure(code, message))
    return rows


def has_head_failure(outputs: Mapping[str, np.ndarray]) -> bool:
    """True when some head failed on some text of a batch (its rows are :class:`HeadFailure`)."""
    return any(
        v.dtype == object and any(isinstance(x, HeadFailure) for x in v)
        for v in outputs.values()
        if isinstance(v, np.ndarray)
    )


def entity_outputs(
    backend: Backend,
    texts: Sequence[str],
    logits: Mapping[str, np.ndarray],
    rules: Mapping[str, HeadRule],
    aggregation: str,
) -> dict[str, np.ndarray]:
    """Each token head's entity spans per text (an object array of lists; None for a text whose
    scores are not finite; a :class:`HeadFailure` for every text when making the spans raised)
    from its padded per-token logits ``[n, T, C]``."""
    try:
        tokens = backend.text_tokens(texts)  # type: ignore[attr-defined]
    except Exception as exc:
        log.error("token heads %s: tokens for entity spans failed: %s: %s", ", ".join(logits), type(exc).__name__, exc)
        return {
            t: failed_rows(len(texts), "inference_failed", f"head '{t}' failed: {type(exc).__name__}") for t in logits
        }
    side = str(getattr(backend, "padding_side", "right"))
    out = {}
    for task, values in logits.items():
        if values.dtype == object:  # the head already failed
            out[task] = values
            continue
        spans = np.empty(len(texts), dtype=object)
        try:
            for i, (text, tok) in enumerate(zip(texts, tokens)):
                rows = token_rows(values[i], len(tok), side)
                spans[i] = (
                    entity_spans(text, tok, softmax(rows), rules[task].labels, aggregation)
                    if np.isfinite(rows).all()
                    else None
                )
        except Exception as exc:
            log.error("token head '%s': entity spans failed: %s: %s", task, type(exc).__name__, exc)
            spans = failed_rows(len(texts), "inference_failed", f"head '{task}' failed: {type(exc).__name__}")
        out[task] = spans
    return out


def _non_finite(task: str) -> HeadErrorVerdict:
    return HeadErrorVerdict(
        error=HeadErrorBody(
            code="non_finite_output",
            message=f"head '{task}' produced non-finite scores (NaN or infinity) for this text: no verdict",
        )
    )


def _head_verdicts(task: str, values: np.ndarray, rule: HeadRule) -> list[Any]:
    """One head's verdict (or error verdict) for each text of ``values`` (its logits, or an object
    array of entity spans, :class:`HeadFailure` or None)."""
    n = len(values)
    if values.dtype == object and rule.problem != "token":
        return [HeadErrorVerdict(error=HeadErrorBody(code=v.code, message=v.message)) for v in values]
    if rule.problem == "token":
        out: list[Any] = []
        for v in values:
            if isinstance(v, HeadFailure):
                out.append(HeadErrorVerdict(error=HeadErrorBody(code=v.code, message=v.message)))
            elif v is None:
                out.append(_non_finite(task))
            else:
                spans = list(v)
                out.append(
                    TokenVerdict(
                        entities=[EntitySpan(**e) for e in spans],
                        flagged=entity_flag(spans, rule.entities, rule.threshold),
                    )
                )
        return out
    finite = np.isfinite(values.reshape(n, -1)).all(axis=-1)
    with np.errstate(all="ignore"):
        probs = sigmoid(values) if rule.problem == "multi_label" else softmax(values)
    names = rule.labels
    benign = {k for k, name in enumerate(names) if name in rule.benign}
    out = []
    for i in range(n):
        if not finite[i] or not np.isfinite(probs[i]).all():
            out.append(_non_finite(task))
            continue
        p = probs[i]
        flagged = label_flag(p, rule.label_thresholds, benign)
        if rule.problem == "multi_label":
            out.append(
                MultiLabelVerdict(
                    probabilities={name: float(v) for name, v in zip(names, p)},
                    labels=[name for name, v, c in zip(names, p, rule.label_thresholds) if c is not None and v >= c],
                    flagged=flagged,
                )
            )
            continue
        k = int(p.argmax())
        out.append(
            HeadVerdict(
                label=names[k],
                score=float(p[k]),
                probabilities={name: float(v) for name, v in zip(names, p)},
                flagged=flagged,
            )
        )
    return out


def verdicts(
    outputs: dict[str, np.ndarray], rules: dict[str, HeadRule], truncated: Sequence[bool] | np.ndarray | None = None
) -> list[TextVerdict]:
    """Per text, each head's verdict (see the module docstring): ``outputs`` holds each sequence
    head's logits ``[n, C]`` and each token head's entity spans (an object array of lists); a head
    that failed on a text (non-finite scores, :class:`HeadFailure`, an error while making its
    verdict) gets an error verdict there, which flags the text."""
    tasks = list(outputs)
    n = len(next(iter(outputs.values()))) if outputs else 0
    per_head: dict[str, list[Any]] = {}
    for t in tasks:
        try:
            per_head[t] = _head_verdicts(t, outputs[t], rules[t])
            if len(per_head[t]) != n:
                raise ValueError(f"{len(per_head[t])} verdicts for {n} texts")
        except Exception as exc:
            log.error("head '%s': verdicts failed: %s: %s", t, type(exc).__name__, exc)
            message = f"head '{t}' failed: {type(exc).__name__}"
            per_head[t] = [HeadErrorVerdict(error=HeadErrorBody(code="inference_failed", message=message))] * n
    out = []
    for i in range(n):
        heads = {t: per_head[t][i] for t in tasks}
        out.append(
            TextVerdict(
                flagged=any(h.flagged for h in heads.values()),
                truncated=bool(truncated[i]) if truncated is not None else False,
                heads=heads,
            )
        )
    return out


# -- the app ---------------------------------------------------------------------------------
@dataclass
class _Health:
    """What /healthz reports beyond the batcher: the start-up weight check and the last inference."""

    bad_weights: list[str] = field(default_factory=list)
    last_output_finite: bool = True


def create_app(model_or_backend: Any, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving a merged model (a ``MultiHeadModel`` or a :class:`Backend`).

    The app owns a :class:`MicroBatcher` (started and stopped with the app's lifespan) and a
    Prometheus registry of its own. The backend is not closed by the app. The backend's
    ``bad_weights`` (found when it was built) make ``/v1/classify`` answer 503
    ``non_finite_weights`` and ``/healthz`` report it.
    """
    settings = settings or ServeSettings()
    from guardmerge.models.multihead import MultiHeadModel

    backend: Backend = (
        TorchBackend(model_or_backend) if isinstance(model_or_backend, MultiHeadModel) else model_or_backend
    )
    tasks = backend.tasks
    labels = {t: backend.labels(t) for t in tasks}
    unknown = sorted({key.partition(".")[0] for key in settings.thresholds} - set(tasks))
    if unknown:
        raise GuardmergeError(f"threshold for unknown task(s) {', '.join(unknown)}; this model has: {', '.join(tasks)}")
    settings.validate()  # fields may have been changed since the settings were made
    rules = head_rules(backend, settings)
    metrics = Metrics()
    health = _Health()
    token_tasks = {t for t, r in rules.items() if r.problem == "token"}

    truncated_of = getattr(backend, "truncated", None)

    def run_heads(texts: Sequence[str], chosen: Sequence[str] | None) -> dict[str, np.ndarray]:
        """Every head's logits in one pass; when that raises, each head alone, so that a failing head
        gets :class:`HeadFailure` rows and the others still answer (all failing: the error is raised)."""
        try:
            return dict(backend.logits(texts, chosen))
        except NonFiniteWeightsError:
            raise
        except Exception as exc:
            names = list(chosen) if chosen is not None else list(tasks)
            if len(names) < 2:
                raise
            log.warning(
                "inference of %d heads failed (%s: %s); running each head alone", len(names), type(exc).__name__, exc
            )
            out: dict[str, np.ndarray] = {}
            for t in names:
                try:
                    out[t] = backend.logits(texts, [t])[t]
                except NonFiniteWeightsError:
                    raise
                except Exception as head_exc:
                    log.error("head '%s' failed on %d texts: %s: %s", t, len(texts), type(head_exc).__name__, head_exc)
                    out[t] = failed_rows(
                        len(texts), "inference_failed", f"head '{t}' failed: {type(head_exc).__name__}"
                    )
            if all(v.dtype == object for v in out.values()):
                raise exc from None
            return out

    def infer(texts: Sequence[str], chosen: Sequence[str] | None) -> dict[str, np.ndarray]:
        """Logits of the sequence heads, entity spans (an object array) of the token heads, and each
        text's truncation flag: made here, on the worker thread, which alone uses the tokenizer."""
        flags = np.asarray(truncated_of(texts) if callable(truncated_of) else [False] * len(texts), dtype=bool)
        out = run_heads(texts, chosen)
        health.last_output_finite = all(bool(np.isfinite(v).all()) for v in out.values() if v.dtype != object)
        wanted = [t for t in out if t in token_tasks]
        if wanted:
            out.update(entity_outputs(backend, texts, {t: out[t] for t in wanted}, rules, settings.aggregation))
        out[TRUNCATED] = flags
        return out

    batcher = MicroBatcher(
        infer,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        max_queue=max(settings.max_queue, settings.max_texts),
        on_batch=metrics.on_batch,
        shared=(TRUNCATED,),
        partial_failure=has_head_failure,
    )
    metrics.watch_queue(batcher)
    info = backend.info
    model_info = ModelInfo(
        base_model=public_model_name(str(info["base_model"])) if info.get("base_model") is not None else None,
        method=info.get("method"),
        parameters=dict(info.get("parameters") or {}),
        heads=[head_info(t, rules[t], settings.aggregation) for t in tasks],
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

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        found = getattr(backend, "bad_weights", None)
        if found is None:  # a backend of an older interface
            check = getattr(backend, "non_finite_weights", None)
            found = check() if callable(check) else []
        health.bad_weights = list(found)
        if health.bad_weights:
            log.error(
                "the model's weights hold NaN or infinity in %d tensor(s) (%s): /healthz reports 503 and "
                "classifications are refused with 503 non_finite_weights",
                len(health.bad_weights),
                ", ".join(health.bad_weights[:5]),
            )
        await batcher.start()
        log.info("serving %d heads (%s) with the %s backend", len(tasks), ", ".join(tasks), backend.name)
        try:
            yield
        finally:
            await batcher.stop()

    if settings.api_key:  # the document is public: no head names (GET /v1/model shows them, with the key)
        heads_note = "Heads: see GET /v1/model."
        auth_note = " Requests to /v1/* and /metrics need `Authorization: Bearer <key>`."
    else:
        heads_note, auth_note = f"Heads: {', '.join(tasks)}.", ""
    app = FastAPI(
        title="guardmerge",
        version=__version__,
        summary="One merged multi-head guard model: every guard's verdict in one call.",
        description=(
            f"{heads_note} Limits: {settings.max_texts} texts per request, "
            f"{settings.max_chars} characters per text. A head flags a text when a label other than "
            "its benign ones reaches the head's threshold." + auth_note
        ),
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.backend = backend
    app.state.settings = settings
    app.state.health = health

    def error(
        request: Request,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        metrics.errors.labels(_endpoint(request.scope), code).inc()
        body = ErrorResponse(error=ErrorBody(code=code, message=_safe_json(message), details=_safe_json(details)))
        return JSONResponse(body.model_dump(), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error(request, exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype != "application/json" and not ctype.endswith("+json"):
            return error(
                request,
                415,
                "unsupported_media_type",
                f"the body must be JSON sent with 'Content-Type: application/json' (got '{ctype}')",
            )
        if any(e.get("type") == "json_invalid" for e in errs):
            return error(request, 400, "malformed_json", "the request body is not valid JSON")
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errs]
        first = details[0] if details else {"loc": [], "msg": "invalid request", "type": ""}
        if first["loc"] == ["body"]:
            return error(
                request,
                422,
                "invalid_request",
                'the body must be a JSON object: {"texts": [str, ...], "tasks": [str, ...] (optional)}',
                details,
            )
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return error(request, 422, "invalid_request", f"{where}: {first['msg']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
            log.info("unparsable body on %s: %s", request.url.path, type(exc.__cause__).__name__)
            return error(
                request, 400, "malformed_json", f"the request body is not valid JSON ({type(exc.__cause__).__name__})"
            )
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(request, exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error(request, 500, "internal_error", "internal server error")

    def on_done(scope: Scope, status: int, seconds: float) -> None:
        endpoint = _endpoint(scope)
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(seconds)

    # a body that cannot be within the limits is refused (JSON escapes: 6 bytes/char), while it streams
    max_body = settings.max_texts * (6 * settings.max_chars + 8) + 4096
    app.add_middleware(
        RequestGate,
        error=error,
        on_done=on_done,
        api_key=settings.api_key,
        protected=("/v1/", "/metrics"),
        json_routes={("POST", "/v1/classify")},
        max_body=max_body,
        body_timeout=settings.body_timeout,
    )

    bearer = HTTPBearer(auto_error=False, description="The server's API key (--api-key or $GUARDMERGE_API_KEY).")

    async def require_key(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        """Documents the bearer scheme in OpenAPI; the gate has already checked the key."""
        problem = bearer_problem(request.headers.get("authorization"), settings.api_key or "")
        if problem is not None:
            raise APIError(401, "unauthorized", problem, headers={"WWW-Authenticate": "Bearer"})

    protected = APIRouter(dependencies=[Depends(require_key)] if settings.api_key else [])

    @protected.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=_ERRORS,
        tags=["guard"],
        summary="Classify texts with every (or the requested) head",
    )
    async def classify(body: ClassifyRequest) -> ClassifyResponse:
        """Per text: each requested head's label, score, probabilities and flag; texts of concurrent
        requests share micro-batches. Texts are normalised to Unicode NFC first."""
        if len(body.texts) > settings.max_texts:
            raise APIError(
                413, "too_many_texts", f"{len(body.texts)} texts in one request; the limit is {settings.max_texts}"
            )
        long = [i for i, t in enumerate(body.texts) if len(t) > settings.max_chars]
        if long:
            raise APIError(
                413,
                "text_too_long",
                f"text {long[0]} has {len(body.texts[long[0]])} characters; the limit is {settings.max_chars}",
                {"indexes": long[:100]},
            )
        texts, invalid = normalise_texts(body.texts)
        if invalid:
            raise APIError(422, "invalid_text", str(invalid[0]), {"indexes": [e.index for e in invalid[:100]]})
        chosen = list(dict.fromkeys(body.tasks)) if body.tasks else tasks
        bad = [t for t in chosen if t not in labels]
        if bad:
            raise APIError(
                400,
                "unknown_task",
                f"unknown task(s) {', '.join(repr(t) for t in bad)}; this model has: {', '.join(tasks)}",
                {"unknown": bad, "tasks": tasks},
            )
        if health.bad_weights:
            raise APIError(503, "non_finite_weights", str(NonFiniteWeightsError(health.bad_weights)))
        logits = await run_inference(texts, None if body.tasks is None else chosen)
        results = verdicts({t: logits[t] for t in chosen}, rules, logits.get(TRUNCATED))
        failed = 0
        for row in results:
            errors = [(t, h.error.code) for t, h in row.heads.items() if isinstance(h, HeadErrorVerdict)]
            failed += bool(errors)
            for task, code in errors:
                metrics.head_errors.labels(task, code).inc()
        if failed:
            log.error("%d of %d texts have heads without a verdict (error verdicts, flagged)", failed, len(texts))
        return ClassifyResponse(tasks=chosen, results=results)

    async def run_inference(texts: list[str], chosen: list[str] | None) -> dict[str, np.ndarray]:
        """The batcher's output for ``texts`` within the inference timeout, or an :class:`APIError`."""
        job = asyncio.ensure_future(batcher.submit(texts, chosen))
        try:
            done, _ = await asyncio.wait({job}, timeout=settings.inference_timeout)
        finally:
            if not job.done():
                job.cancel()
        if not done:
            log.error("inference of %d texts did not finish within %g s", len(texts), settings.inference_timeout)
            raise APIError(
                504,
                "inference_timeout",
                f"the texts were not classified within {settings.inference_timeout:g} s (--inference-timeout); "
                "no verdict is given",
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

    @protected.get(
        "/v1/model",
        response_model=ModelInfo,
        responses={401: _ERRORS[401]},
        tags=["guard"],
        summary="The served model: base, heads, labels, method, version, limits",
    )
    async def model() -> ModelInfo:
        return model_info

    @protected.get(
        "/metrics",
        response_class=Response,
        responses={401: _ERRORS[401]},
        tags=["ops"],
        summary="Prometheus metrics (text exposition format)",
    )
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(protected)

    @app.get(
        "/healthz",
        response_model=Health,
        response_model_exclude_none=True,
        responses={503: {"model": Health}},
        tags=["ops"],
        summary="Readiness: 200 when ready to classify (never needs a token)",
    )
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

    return app
