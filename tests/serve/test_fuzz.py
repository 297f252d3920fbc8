"""Fuzz the HTTP API from its own OpenAPI document (schemathesis), in process against the ASGI
app serving the tiny merged model: no 5xx, and every response (status code, content type, body,
headers) conforms to the document. Bounded: a few dozen examples per operation (seconds;
``-m 'not slow and not fuzz'`` leaves it out)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from guardmerge.models.multihead import MultiHeadModel  # noqa: E402

pytestmark = pytest.mark.fuzz

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


OPERATIONS = [("POST", "/v1/classify"), ("GET", "/v1/model"), ("GET", "/healthz"), ("GET", "/metrics")]


@pytest.fixture(scope="module")
def api_schema(merged: MultiHeadModel) -> Any:
    from guardmerge.serve import ServeSettings, create_app

    app = create_app(merged, ServeSettings(max_texts=8, max_chars=300, max_wait_ms=1.0))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_document_lists_every_operation(api_schema: Any) -> None:
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


# negative cases (bodies that break the schema) only where there is a body: the GETs take nothing
CASES = [(m, p, "positive") for m, p in OPERATIONS] + [("POST", "/v1/classify", "negative")]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_api_conforms_to_its_schema(api_schema: Any, method: str, path: str, mode: str) -> None:
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
    seen: list[int] = []

    @given(case=strategy)
    @settings(
        max_examples=40 if method == "POST" else 5,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(checks=CHECKS)
        seen.append(response.status_code)

    run()
    assert seen and max(seen) < 500
    if mode == "positive" and method == "POST":
        assert 200 in seen  # valid requests really classified, not only refused
