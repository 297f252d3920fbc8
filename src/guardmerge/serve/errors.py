"""Errors of the HTTP API: :class:`APIError`, the catalogue the OpenAPI document lists (:data:`ERRORS`),
and the handlers that answer every error as JSON ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from guardmerge.serve.gate import ErrorFactory
from guardmerge.serve.metrics import Metrics
from guardmerge.serve.schemas import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

__all__ = ["ERRORS", "APIError", "add_error_handlers", "error_factory", "safe_json"]


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


ERRORS: dict[int | str, dict[str, Any]] = {
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

"""The error responses of ``POST /v1/classify`` in the OpenAPI document (the other routes: 401 only)."""


def safe_json(value: Any) -> Any:
    """``value`` with every string made encodable as UTF-8 (lone surrogates become ``\\udXXX``)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {safe_json(k): safe_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [safe_json(v) for v in value]
    return value


def error_factory(metrics: Metrics) -> ErrorFactory:
    """``error(request, status, code, message, details=None, headers=None)``: the JSON error response,
    counted in ``metrics``."""

    def error(
        request: Request,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        metrics.on_error(request.scope, code)
        body = ErrorResponse(error=ErrorBody(code=code, message=safe_json(message), details=safe_json(details)))
        return JSONResponse(body.model_dump(), status_code=status, headers=headers)

    return error


def _invalid_request(request: Request, exc: RequestValidationError, error: ErrorFactory) -> Any:
    """415, 400 or 422 for a body FastAPI could not validate."""
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


def add_error_handlers(app: FastAPI, error: ErrorFactory) -> None:
    """Answer :class:`APIError`, invalid requests, HTTP errors and any other exception with ``error``."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Any:
        return error(request, exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        return _invalid_request(request, exc, error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
            log.info("unparsable body on %s: %s", request.url.path, type(exc.__cause__).__name__)
            return error(
                request, 400, "malformed_json", f"the request body is not valid JSON ({type(exc.__cause__).__name__})"
            )
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(request, exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Any:
        log.exception("unhandled error on %s", request.url.path)
        return error(request, 500, "internal_error", "internal server error")
