"""Connection limits: the request-head timeout, the connection cap that idle connections cannot exhaust, loopback."""

from __future__ import annotations

import math
import resource
import socket
import time
from collections.abc import Callable

import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

from guardmerge.errors import GuardmergeError  # noqa: E402
from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import ServeSettings, create_app  # noqa: E402
from guardmerge.serve.server import guarded_protocol, header_timeout_protocol, is_loopback, uvicorn_limits  # noqa: E402
from tests.serve.conftest import classify_texts, metric_samples, read_response, running, send_request  # noqa: E402


def test_slow_request_head_is_closed(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged, uvicorn_options={"http": header_timeout_protocol(0.5)}) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")  # a full request is served
            first = read_response(sock)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # then a head that never ends
            started = time.monotonic()
            rest = sock.recv(1024)
        with socket.create_connection((host, int(port)), timeout=20) as fresh:
            fresh.sendall(b"GET /hea")  # a new connection that never finishes its head
            fresh_rest = fresh.recv(1024)
    assert first.startswith(b"HTTP/1.1 200")
    assert rest == b"" and fresh_rest == b""  # closed by the server, not by the 20 s socket timeout
    assert time.monotonic() - started < 20


def test_header_timeout_protocol_refuses_nonpositive() -> None:
    with pytest.raises(GuardmergeError, match="header-timeout"):
        header_timeout_protocol(0)


def test_is_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.1", "example.com"))


def _open_idle(host: str, port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        socks.append(s)
    return socks


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def test_idle_connections_do_not_starve_authenticated_requests(merged: MultiHeadModel) -> None:
    # The reported attack: 520 idle connections against the default cap of 512. Both ends live in this
    # process (about 2 x 520 descriptors); where the descriptor limit cannot hold that, the same attack is
    # scaled down to 80 idle connections against a cap of 64.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    idle, cap = 520, 512
    need = 2 * idle + 256
    if soft < need:
        if hard == resource.RLIM_INFINITY or hard >= need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        else:
            idle, cap = 80, 64
    app = create_app(merged, ServeSettings(api_key="k"))
    protocol = guarded_protocol(60.0, max_connections=cap)  # no header timeout during the test: only the cap acts
    socks: list[socket.socket] = []
    try:
        with running(app, http=protocol) as url:
            host, port = url.removeprefix("http://").split(":")
            socks = _open_idle(host, int(port), idle)
            time.sleep(0.5)  # the server accepts them all
            statuses = [
                classify_texts(url, ["sure"], headers={"Authorization": "Bearer k"}).status_code for _ in range(10)
            ]
            health = httpx.get(f"{url}/healthz", timeout=30)
            samples = metric_samples(httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer k"}).text)
            closed = sum(_closed_by_server(s) for s in socks)
    finally:
        for s in socks:
            s.close()
    assert statuses == [200] * 10
    assert health.status_code == 200
    assert samples[("guardmerge_requests_total", (("endpoint", "/v1/classify"), ("status", "200")))] == 10
    # the oldest idle connections made room for each newcomer beyond the cap, and only as many as needed:
    # the idle ones past the cap, then one for the first request (each later one mostly reuses the slot
    # its predecessor freed)
    assert idle - cap + 1 <= closed <= idle - cap + 12


def test_beyond_the_cap_with_no_idle_connection_requests_get_503_and_healthz_is_answered(
    merged: MultiHeadModel,
) -> None:
    app = create_app(merged, ServeSettings())
    busy: list[socket.socket] = []
    try:
        with running(app, http=guarded_protocol(60.0, max_connections=4), timeout_keep_alive=60) as url:
            host, port = url.removeprefix("http://").split(":")
            for _ in range(4):  # four keep-alive connections that have each sent a request: none is idle-new
                s = socket.create_connection((host, int(port)), timeout=10)
                assert send_request(s, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").startswith(b"HTTP/1.1 200")
                busy.append(s)
            refused = classify_texts(url, ["sure"])
            health = httpx.get(f"{url}/healthz", timeout=30)
            for s in busy:
                s.close()
            busy = []
            time.sleep(0.2)
            samples = metric_samples(httpx.get(f"{url}/metrics").text)
    finally:
        for s in busy:
            s.close()
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
    assert health.status_code == 200
    assert samples[("guardmerge_errors_total", (("code", "overloaded"), ("endpoint", "/v1/classify")))] == 1


def test_uvicorn_limits() -> None:
    limits = uvicorn_limits(header_timeout=2.0, keep_alive_timeout=3.0, max_connections=7)
    assert set(limits) == {"http", "timeout_keep_alive"} and limits["timeout_keep_alive"] == 3.0
    assert limits["http"].header_timeout == 2.0 and limits["http"].max_connections == 7
    assert guarded_protocol(1.0).max_connections is None  # type: ignore[attr-defined]
    for kwargs, needle in [
        ({"keep_alive_timeout": 0.0}, "--keep-alive-timeout"),
        ({"keep_alive_timeout": math.nan}, "--keep-alive-timeout"),
        ({"max_connections": 0}, "--max-connections"),
        ({"max_connections": True}, "--max-connections"),
        ({"header_timeout": 3601.0}, "--header-timeout"),
    ]:
        with pytest.raises(GuardmergeError, match=needle):
            uvicorn_limits(**{"header_timeout": 1.0, "keep_alive_timeout": 1.0, "max_connections": 1, **kwargs})
