"""The gate: auth before the body, media type, a streamed size and time limit; bearer tokens compared as bytes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import ServeSettings, create_app  # noqa: E402
from guardmerge.serve.gate import MISSING_TOKEN, WRONG_TOKEN, bearer_problem, is_json_media_type  # noqa: E402
from tests.serve.conftest import JSON, classify, error_count, read_response, send_request  # noqa: E402


def test_api_key_required_except_healthz(merged: MultiHeadModel, serve: Callable) -> None:
    good = {"Authorization": "Bearer s3cret"}
    with serve(merged, api_key="s3cret") as url:
        none = classify(url, {"texts": ["a"]})
        wrong = classify(url, {"texts": ["a"]}, headers={"Authorization": "Bearer nope"})
        basic = classify(url, {"texts": ["a"]}, headers={"Authorization": "Basic czNjcmV0"})
        ok = classify(url, {"texts": ["a"]}, headers=good)
        model_no, model_ok = httpx.get(f"{url}/v1/model"), httpx.get(f"{url}/v1/model", headers=good)
        metrics_no, metrics_ok = httpx.get(f"{url}/metrics"), httpx.get(f"{url}/metrics", headers=good)
        health = httpx.get(f"{url}/healthz")
        spec = httpx.get(f"{url}/openapi.json").json()
        # auth is checked before the body: a bad body without a key is still 401
        bad_body = httpx.post(f"{url}/v1/classify", json={"nope": 1})
    for res in (none, wrong, basic, model_no, metrics_no, bad_body):
        assert res.status_code == 401, res.text
        assert res.json()["error"]["code"] == "unauthorized"
        assert res.headers["www-authenticate"] == "Bearer"
    assert "missing" in none.json()["error"]["message"] and "wrong" in wrong.json()["error"]["message"]
    assert ok.status_code == 200 and model_ok.status_code == 200 and metrics_ok.status_code == 200
    assert health.status_code == 200
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert 'code="unauthorized"' in metrics_ok.text


def _chunks(total: int, size: int, sent: list[int]) -> Callable[[], AsyncIterator[bytes]]:
    async def gen() -> AsyncIterator[bytes]:
        for _ in range(total // size):
            sent.append(size)
            yield b" " * size

    return gen


def test_unauthenticated_chunked_body_is_refused_unread(merged: MultiHeadModel) -> None:
    app = create_app(merged, ServeSettings(api_key="k"))
    sent: list[int] = []

    async def go() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v1/classify", content=_chunks(4 << 20, 64 << 10, sent)(), headers=JSON)

    res = asyncio.run(go())
    assert res.request.headers["transfer-encoding"] == "chunked"
    assert res.status_code == 401 and res.json()["error"]["code"] == "unauthorized"
    assert sent == []  # not one chunk was read
    assert res.headers["connection"] == "close"


def test_unauthenticated_request_is_answered_before_its_body_is_sent(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged, api_key="k") as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )  # the head only: no body follows
            head = read_response(sock)
    assert head.startswith(b"HTTP/1.1 401") and b"unauthorized" in head


def test_chunked_body_over_the_limit_is_413_while_streaming(merged: MultiHeadModel) -> None:
    app = create_app(merged, ServeSettings(api_key="k"))  # limit: about 1.5 MB
    limit = 64 * (6 * 4000 + 8) + 4096
    sent: list[int] = []

    async def go() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(
                "/v1/classify",
                content=_chunks(4 << 20, 64 << 10, sent)(),
                headers={**JSON, "Authorization": "Bearer k"},
            )

    res = asyncio.run(go())
    assert res.status_code == 413, res.text
    assert res.json()["error"]["code"] == "body_too_large" and str(limit) in res.json()["error"]["message"]
    assert limit < sum(sent) <= limit + (64 << 10)  # stopped at the first chunk past the limit
    assert sum(sent) < 4 << 20


def test_stalled_body_gets_408(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged, body_timeout=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n" + b'{"texts": ['
            )  # then nothing more
            response = read_response(sock)
            closed = sock.recv(1) == b""
        errors = error_count(url, "request_timeout")
    assert response.startswith(b"HTTP/1.1 408"), response
    assert b'"request_timeout"' in response and b"within 0.5 s" in response
    assert closed and errors == 1


def test_unauthenticated_requests_close_their_connection(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged, api_key="k") as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = send_request(sock, b"GET /v1/model HTTP/1.1\r\nHost: t\r\n\r\n")
            sock.settimeout(10)
            rest = b""
            while True:
                more = sock.recv(65536)
                if not more:
                    break
                rest += more
    assert head.startswith(b"HTTP/1.1 401") and b"connection: close" in head.lower()


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (None, MISSING_TOKEN),
        ("", MISSING_TOKEN),
        ("Bearer", MISSING_TOKEN),
        ("Basic k3y", MISSING_TOKEN),
        ("Bearer k3y", None),
        ("  bearer   k3y  ", None),
        ("Bearer k3", WRONG_TOKEN),
        ("Bearer k3yy", WRONG_TOKEN),
    ],
)
def test_bearer_problem(header: str | None, problem: str | None) -> None:
    assert bearer_problem(header, "k3y") == problem


def test_bearer_problem_compares_the_utf8_bytes_of_the_key() -> None:
    key = "cl\u00e9"
    sent = "Bearer " + key.encode("utf-8").decode("latin-1")  # what a server reads from the header's bytes
    assert bearer_problem(sent, key) is None
    assert bearer_problem(f"Bearer {key}", key) == WRONG_TOKEN  # latin-1 bytes are not the key's UTF-8


@pytest.mark.parametrize(
    ("content_type", "json"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/problem+json", True),
        ("text/json", False),
        ("text/plain", False),
        ("", False),
    ],
)
def test_is_json_media_type(content_type: str, json: bool) -> None:
    assert is_json_media_type(content_type) is json
