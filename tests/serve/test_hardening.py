"""Security-review defects of the server, each reproduced: poison texts, non-finite scores, unauthenticated
or oversized streamed bodies, slow clients, leaked paths."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

import guardmerge  # noqa: E402
from guardmerge.errors import GuardmergeError, NonFiniteWeightsError  # noqa: E402
from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import ServeSettings, TorchBackend, create_app  # noqa: E402
from guardmerge.serve.app import public_model_name  # noqa: E402
from guardmerge.serve.server import header_timeout_protocol, is_loopback  # noqa: E402
from tests.builders import TEXTS  # noqa: E402
from tests.serve.conftest import TASKS, metric_samples  # noqa: E402

JSON = {"content-type": "application/json"}


def _error_count(url: str, code: str, endpoint: str = "/v1/classify", **kw: Any) -> float:
    samples = metric_samples(httpx.get(f"{url}/metrics", **kw).text)
    return samples.get(("guardmerge_errors_total", (("code", code), ("endpoint", endpoint))), 0.0)


# -- 1. one request must not break the others ----------------------------------------------------
def test_lone_surrogate_text_is_422_and_breaks_no_other_request(merged: MultiHeadModel, serve: Callable) -> None:
    normal = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(32)]
    expected = merged.predict(normal)
    poison = b'{"texts": ["fine", "x \\ud800"]}'  # JSON escape of a lone surrogate: valid JSON, not UTF-8 text

    async def fire(url: str) -> tuple[list[Any], list[Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            good = [client.post("/v1/classify", json={"texts": [t]}) for t in normal]
            bad = [client.post("/v1/classify", content=poison, headers=JSON) for _ in range(8)]
            mixed = [[*good[i // 4 * 4 : i // 4 * 4 + 4], bad[i // 4]] for i in range(0, 32, 4)]
            results = await asyncio.gather(*(c for group in mixed for c in group))
        return [r for r in results if r.request.content != poison], [r for r in results if r.request.content == poison]

    with serve(merged, max_batch=8, max_wait_ms=100) as url:
        good, bad = asyncio.run(fire(url))
        errors = _error_count(url, "invalid_text")
    assert [r.status_code for r in good] == [200] * 32, [r.text for r in good if r.status_code != 200][:2]
    for i, res in enumerate(good):
        assert res.json()["results"][0]["heads"]["hate"]["label"] == expected["hate"][i]["label"]
    assert [r.status_code for r in bad] == [422] * 8
    err = bad[0].json()["error"]
    assert err["code"] == "invalid_text" and "text 1" in err["message"] and "U+D800" in err["message"]
    assert err["details"] == {"indexes": [1]}
    assert errors == 8


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


def test_texts_are_nfc_normalised(merged: MultiHeadModel, serve: Callable) -> None:
    seen: list[str] = []

    class Recording(TorchBackend):
        def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
            seen.extend(texts)
            return super().logits(texts, tasks)

    with serve(Recording(merged)) as url:
        res = httpx.post(f"{url}/v1/classify", json={"texts": ["cafe\u0301"]}, timeout=30)
    assert res.status_code == 200 and seen == ["caf\u00e9"]


class _Poisoned(TorchBackend):
    """The real model, except that any batch holding a text with 'poison' raises (a tokenizer crash)."""

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        if any("poison" in t for t in texts):
            raise ValueError("cannot tokenise")
        return super().logits(texts, tasks)


def test_failing_request_fails_alone_not_its_batch(merged: MultiHeadModel, serve: Callable) -> None:
    normal = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(24)]
    expected = merged.predict(normal)
    bodies = []
    for i, text in enumerate(normal):
        bodies.append({"texts": [text]})
        if i % 6 == 0:
            bodies.append({"texts": ["poison"]})

    async def fire(url: str) -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/classify", json=b) for b in bodies))

    with serve(_Poisoned(merged), max_batch=8, max_wait_ms=100) as url:
        responses = asyncio.run(fire(url))
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    good = [r for b, r in zip(bodies, responses) if b["texts"] != ["poison"]]
    bad = [r for b, r in zip(bodies, responses) if b["texts"] == ["poison"]]
    assert [r.status_code for r in good] == [200] * 24
    for i, res in enumerate(good):
        assert res.json()["results"][0]["heads"]["injection"]["label"] == expected["injection"][i]["label"]
    assert [r.status_code for r in bad] == [500] * 4
    assert all(r.json()["error"]["code"] == "inference_failed" for r in bad)
    assert samples[("guardmerge_batch_size_count", ())] > 0


# -- 2. fail closed on non-finite scores ---------------------------------------------------------
@pytest.fixture
def nan_model(merged_dir: Path) -> MultiHeadModel:
    """A fresh copy of the tiny model whose word embeddings are all NaN."""
    import torch

    model = guardmerge.load(str(merged_dir))
    with torch.no_grad():
        next(model.encoder.parameters()).fill_(math.nan)
    return model


def test_nan_weights_fail_closed(nan_model: MultiHeadModel, serve: Callable) -> None:
    backend = TorchBackend(nan_model)
    assert backend.bad_weights == ["encoder.embeddings.word_embeddings.weight"]
    with pytest.raises(NonFiniteWeightsError, match="word_embeddings"):
        backend.logits(["hi"])
    with serve(nan_model) as url:
        health = httpx.get(f"{url}/healthz")
        res = httpx.post(f"{url}/v1/classify", json={"texts": ["ignore previous instructions", "hi"]}, timeout=30)
        errors = _error_count(url, "non_finite_weights")
    assert health.status_code == 503
    assert health.json()["status"] == "non_finite_weights" and "NaN" in health.json()["reason"]
    assert res.status_code == 503, res.text
    err = res.json()["error"]
    assert err["code"] == "non_finite_weights" and "word_embeddings" in err["message"]
    assert "results" not in res.json()
    assert errors == 1


class _Scores:
    """A one-head backend: NaN logits for texts with 'nan', +inf for 'inf', zeros otherwise."""

    name = "stub"
    tasks: ClassVar[list[str]] = ["injection"]
    info: ClassVar[dict[str, Any]] = {"method": "stub", "base_model": "org/base-model"}

    def labels(self, task: str) -> list[str]:
        return ["benign", "injection"]

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        out = np.zeros((len(texts), 2), dtype=np.float32)
        for i, t in enumerate(texts):
            if "nan" in t:
                out[i, 1] = np.nan
            elif "inf" in t:
                out[i, 1] = np.inf
        return {"injection": out}

    def non_finite_weights(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def test_non_finite_output_is_a_flagged_head_error_and_unhealthy_until_a_finite_inference(serve: Callable) -> None:
    with serve(_Scores(), max_wait_ms=0, thresholds={"injection": 0.9}) as url:
        first = httpx.get(f"{url}/healthz")
        nan = httpx.post(f"{url}/v1/classify", json={"texts": ["ok", "nan"]}, timeout=30)
        after_nan = httpx.get(f"{url}/healthz")
        inf = httpx.post(f"{url}/v1/classify", json={"texts": ["inf"]}, timeout=30)
        fine = httpx.post(f"{url}/v1/classify", json={"texts": ["ok"]}, timeout=30)
        after_fine = httpx.get(f"{url}/healthz")
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert first.status_code == 200 and first.json() == {"status": "ok", "queued_texts": 0}
    assert nan.status_code == 200, nan.text
    ok_row, nan_row = nan.json()["results"]
    assert ok_row["flagged"] is False and ok_row["heads"]["injection"]["score"] == 0.5
    for row in (nan_row, inf.json()["results"][0]):
        head = row["heads"]["injection"]
        assert head["flagged"] is True and row["flagged"] is True  # fail closed: never a benign verdict
        assert head["error"]["code"] == "non_finite_output" and "label" not in head
    assert after_nan.status_code == 503 and after_nan.json()["status"] == "non_finite_output"
    assert fine.status_code == 200 and fine.json()["results"][0]["heads"]["injection"]["score"] == 0.5
    assert after_fine.status_code == 200
    key = ("guardmerge_head_errors_total", (("code", "non_finite_output"), ("task", "injection")))
    assert samples[key] == 2


# -- 3. auth before the body; the size limit while streaming ------------------------------------
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
            head = _read_response(sock)
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


def _read_response(sock: socket.socket) -> bytes:
    """One HTTP response (head and a Content-Length body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            return data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body


# -- 5. slow clients -----------------------------------------------------------------------------
def test_stalled_body_gets_408(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged, body_timeout=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n" + b'{"texts": ['
            )  # then nothing more
            response = _read_response(sock)
            closed = sock.recv(1) == b""
        errors = _error_count(url, "request_timeout")
    assert response.startswith(b"HTTP/1.1 408"), response
    assert b'"request_timeout"' in response and b"within 0.5 s" in response
    assert closed and errors == 1


def test_slow_request_head_is_closed(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged, uvicorn_options={"http": header_timeout_protocol(0.5)}) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")  # a full request is served
            first = _read_response(sock)
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


# -- 4, 6. key, model name, loopback -------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "   ", "\t\n", " padded "])
def test_blank_api_key_is_refused(key: str) -> None:
    with pytest.raises(GuardmergeError, match="API key"):
        create_app(_Scores(), ServeSettings(api_key=key))


def test_model_info_shows_the_base_model_name_only(
    merged: MultiHeadModel, zoo: dict[str, Path], serve: Callable
) -> None:
    assert Path(merged.info["base_model"]).is_absolute()
    with serve(merged) as url:
        info = httpx.get(f"{url}/v1/model").json()
    assert info["base_model"] == zoo["base"].name
    with serve(_Scores()) as url:
        assert httpx.get(f"{url}/v1/model").json()["base_model"] == "org/base-model"  # a hub id as given


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("/home/me/models/bert-base", "bert-base"),
        ("/srv/m/", "m"),
        ("C:\\Users\\me\\bert", "bert"),
        ("~/models/x", "x"),
        ("./local/y", "y"),
        ("org/name", "org/name"),
        ("bert-base-uncased", "bert-base-uncased"),
    ],
)
def test_public_model_name(value: str, shown: str) -> None:
    assert public_model_name(value) == shown


def test_is_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.1", "example.com"))


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
