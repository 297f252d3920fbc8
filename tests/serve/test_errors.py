"""Every error is JSON {error: {code, message, details}}, counted in /metrics and listed in the OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable

import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import create_app  # noqa: E402
from guardmerge.serve.errors import ERRORS, APIError, error_factory, safe_json  # noqa: E402
from guardmerge.serve.metrics import Metrics  # noqa: E402
from guardmerge.serve.schemas import ErrorResponse  # noqa: E402
from tests.serve.conftest import JSON, TASKS, TwoHeads, metric_samples  # noqa: E402


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "needle"),
    [
        ({"json": {"texts": ["a"], "tasks": ["spam", "hate"]}}, 400, "unknown_task", "'spam'"),
        (
            {"content": b'{"texts": ["a"', "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
            "JSON",
        ),
        ({"json": {"texts": [1]}}, 422, "invalid_request", "texts.0"),
        ({"json": {"text": ["a"]}}, 422, "invalid_request", "texts"),
        ({"json": {"texts": []}}, 422, "invalid_request", "texts"),
        ({"json": {"texts": ["a"], "tasks": []}}, 422, "invalid_request", "tasks"),
        ({"json": {"texts": "a"}}, 422, "invalid_request", "texts"),
        ({"json": [1, 2]}, 422, "invalid_request", "JSON object"),
        ({"content": b"", "headers": {"content-type": "application/json"}}, 422, "invalid_request", "JSON object"),
        ({"content": b'{"texts": ["a"]}'}, 415, "unsupported_media_type", "got none"),  # no Content-Type
        ({"content": b""}, 415, "unsupported_media_type", "application/json"),
        (
            {"content": b'{"texts": ["a"]}', "headers": {"content-type": "application/x-www-form-urlencoded"}},
            415,
            "unsupported_media_type",
            "x-www-form-urlencoded",
        ),
        (
            {"content": b'{"texts": ["caf\xe9"]}', "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
            "UTF-8",
        ),
        (
            {"content": b'{"texts": ["a"]}', "headers": {"content-type": "application/json; charset=utf-16"}},
            200,
            "",
            "",
        ),
        (
            {"content": b"[" * 2100 + b"]" * 2100, "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
            "JSON",
        ),  # nested too deep for the parser: not http_error
        ({"json": {"texts": ["a", "b", "c", "d"]}}, 413, "too_many_texts", "limit is 3"),
        ({"json": {"texts": ["ok", "x" * 21]}}, 413, "text_too_long", "text 1 has 21 characters"),
        ({"content": b"x" * 100_000, "headers": {"content-type": "application/json"}}, 413, "body_too_large", "limit"),
        (
            {"content": b'{"texts": ["a"]}', "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
            "application/json",
        ),
    ],
)
def test_errors_are_clear_json(
    merged: MultiHeadModel, serve: Callable, kwargs: dict, status: int, code: str, needle: str
) -> None:
    with serve(merged, max_texts=3, max_chars=20) as url:
        res = httpx.post(f"{url}/v1/classify", timeout=30, **kwargs)
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert res.status_code == status, res.text
    if status == 200:
        return
    err = res.json()["error"]
    assert err["code"] == code and needle in err["message"]
    if code == "unknown_task":
        assert err["details"]["unknown"] == ["spam"]
    endpoint = "/v1/classify"
    assert samples[("guardmerge_errors_total", (("code", code), ("endpoint", endpoint)))] == 1
    assert samples[("guardmerge_requests_total", (("endpoint", endpoint), ("status", str(status))))] == 1


def test_unknown_path_and_method_are_json(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged) as url:
        missing = httpx.get(f"{url}/v2/nothing")
        wrong = httpx.get(f"{url}/v1/classify")
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert samples[("guardmerge_requests_total", (("endpoint", "other"), ("status", "404")))] == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"texts": ["a"], "tasks": ["\\udfff"]}', 400, "unknown_task"),
        (b'{"texts": ["a"], "\\ud800": 1}', 422, "invalid_request"),
        (b'{"texts": ["\\udc80\\ud800"]}', 422, "invalid_text"),
    ],
)
def test_lone_surrogates_anywhere_get_json_errors(
    merged: MultiHeadModel, serve: Callable, body: bytes, status: int, code: str
) -> None:
    with serve(merged) as url:
        res = httpx.post(f"{url}/v1/classify", content=body, headers=JSON, timeout=30)
    assert res.status_code == status, res.text
    assert res.json()["error"]["code"] == code


def test_openapi_documents_the_new_errors(merged: MultiHeadModel) -> None:
    from fastapi.testclient import TestClient

    spec = TestClient(create_app(merged)).get("/openapi.json").json()
    responses = spec["paths"]["/v1/classify"]["post"]["responses"]
    assert {"400", "401", "408", "413", "415", "422", "500", "503", "504"} <= set(responses)
    assert "invalid_text" in responses["422"]["description"]
    assert "inference_failed" in responses["500"]["description"]
    assert "non_finite_weights" in responses["503"]["description"]
    assert "inference_timeout" in responses["504"]["description"]
    assert "reason" in spec["components"]["schemas"]["Health"]["properties"]
    assert TASKS  # the tiny model's heads are documented in the description
    assert all(t in spec["info"]["description"] for t in TASKS)


def test_safe_json_makes_every_string_utf8() -> None:
    value = {"k\ud800": ["a\udfff", ("b", 1)], "n": None, "x": 1.5}
    safe = safe_json(value)
    assert safe == {"k\\ud800": ["a\\udfff", ["b", 1]], "n": None, "x": 1.5}
    import json

    json.dumps(safe).encode("utf-8")  # encodable now
    assert safe_json("plain") == "plain"


def test_api_error_carries_its_response() -> None:
    exc = APIError(503, "overloaded", "busy", {"n": 1}, headers={"Retry-After": "1"})
    assert (exc.status, exc.code, exc.message, exc.details, exc.headers) == (
        503,
        "overloaded",
        "busy",
        {"n": 1},
        {"Retry-After": "1"},
    )
    assert str(exc) == "busy" and APIError(400, "c", "m").headers is None


def test_the_catalogue_documents_every_status_with_the_error_body() -> None:
    assert set(ERRORS) == {400, 401, 408, 413, 415, 422, 500, 503, 504}
    assert all(entry["model"] is ErrorResponse and entry["description"] for entry in ERRORS.values())
    assert "unauthorized" in ERRORS[401]["description"] and "body_too_large" in ERRORS[413]["description"]


def test_error_factory_answers_json_and_counts_it() -> None:
    import json

    from starlette.requests import Request

    metrics = Metrics()
    error = error_factory(metrics)
    request = Request({"type": "http", "method": "POST", "path": "/v1/classify", "headers": []})
    res = error(request, 413, "too_many_texts", "too many \ud800", {"indexes": [1]}, {"X-Test": "1"})
    assert res.status_code == 413 and res.headers["x-test"] == "1"
    assert json.loads(res.body) == {
        "error": {"code": "too_many_texts", "message": "too many \\ud800", "details": {"indexes": [1]}}
    }
    count = metrics.registry.get_sample_value(
        "guardmerge_errors_total", {"endpoint": "/v1/classify", "code": "too_many_texts"}
    )
    assert count == 1


def test_an_unhandled_error_is_500_internal_error() -> None:
    from fastapi.testclient import TestClient

    app = create_app(TwoHeads())

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail")

    with TestClient(app, raise_server_exceptions=False) as client:
        res = client.get("/boom")
    assert res.status_code == 500
    assert res.json()["error"] == {"code": "internal_error", "message": "internal server error", "details": None}
