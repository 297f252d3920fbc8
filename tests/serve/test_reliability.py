"""Reliability defects of the server, each reproduced: one head's failure fails closed per head, inference
timeouts, settings without bounds, truncated texts, idle connections starving requests, head names in the
public OpenAPI document."""

from __future__ import annotations

import asyncio
import math
import resource
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

from guardmerge.errors import GuardmergeError  # noqa: E402
from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import ServeSettings, TorchBackend, create_app  # noqa: E402
from guardmerge.serve.server import guarded_protocol  # noqa: E402
from tests.serve.conftest import metric_samples, running  # noqa: E402

QUIET = {"a": 0.9, "b": 0.9}  # zeros give p = 0.5: below these thresholds, a normal verdict does not flag


class _TwoHeads:
    """Heads a and b. Head b gives NaN for texts with 'nan' and raises on a batch holding 'poison';
    ``fail_all`` makes every call raise; ``release`` (when set) blocks each call until it is set."""

    name = "stub"
    tasks: ClassVar[list[str]] = ["a", "b"]
    info: ClassVar[dict[str, Any]] = {"method": "stub"}

    def __init__(self, fail_all: bool = False, release: threading.Event | None = None) -> None:
        self.fail_all = fail_all
        self.release = release
        self.calls: list[tuple[int, tuple[str, ...]]] = []

    def labels(self, task: str) -> list[str]:
        return ["benign", "bad"]

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        chosen = tuple(tasks) if tasks is not None else tuple(self.tasks)
        self.calls.append((len(texts), chosen))
        if self.release is not None:
            self.release.wait(30)
        if self.fail_all:
            raise RuntimeError("the encoder crashed")
        if "b" in chosen and any("poison" in t for t in texts):
            raise ValueError("head b cannot read this text")
        out = {}
        for task in chosen:
            values = np.zeros((len(texts), 2), dtype=np.float32)
            if task == "b":
                values[[i for i, t in enumerate(texts) if "nan" in t], 1] = np.nan
            out[task] = values
        return out

    def close(self) -> None:
        pass


def _classify(url: str, texts: list[str], **kw: Any) -> Any:
    return httpx.post(f"{url}/v1/classify", json={"texts": texts}, timeout=30, **kw)


# -- 2. one head's failure is reported per head; a guard fails closed --------------------------------------
def test_a_head_with_non_finite_scores_fails_closed_while_the_other_answers(serve: Callable) -> None:
    with serve(_TwoHeads(), thresholds=QUIET, max_wait_ms=0) as url:
        res = _classify(url, ["fine", "nan here"])
        health = httpx.get(f"{url}/healthz")
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert res.status_code == 200, res.text
    fine, bad = res.json()["results"]
    assert fine["flagged"] is False and fine["heads"]["b"]["score"] == 0.5
    assert bad["heads"]["a"] == {"label": "benign", "score": 0.5, "probabilities": {"benign": 0.5, "bad": 0.5},
                                 "flagged": False}  # fmt: skip
    assert bad["heads"]["b"]["error"]["code"] == "non_finite_output" and "'b'" in bad["heads"]["b"]["error"]["message"]
    assert bad["heads"]["b"]["flagged"] is True and bad["flagged"] is True  # never a benign verdict
    assert health.status_code == 503 and health.json()["status"] == "non_finite_output"
    assert samples[("guardmerge_head_errors_total", (("code", "non_finite_output"), ("task", "b")))] == 1


def test_a_head_that_raises_fails_closed_while_the_other_answers(serve: Callable) -> None:
    with serve(_TwoHeads(), thresholds=QUIET, max_wait_ms=0) as url:
        res = _classify(url, ["poison", "fine"])
        only_a = httpx.post(f"{url}/v1/classify", json={"texts": ["poison"], "tasks": ["a"]}, timeout=30)
    with serve(_TwoHeads(fail_all=True), max_wait_ms=0) as url:
        every = _classify(url, ["a", "b"])
    assert res.status_code == 200, res.text
    for row in res.json()["results"]:  # the whole request holds the poison: head b fails for both texts
        assert row["heads"]["a"]["label"] == "benign" and row["heads"]["a"]["flagged"] is False
        assert row["heads"]["b"] == {
            "error": {"code": "inference_failed", "message": "head 'b' failed: ValueError"},
            "flagged": True,
        }
        assert row["flagged"] is True
    assert only_a.status_code == 200 and only_a.json()["results"][0]["flagged"] is False
    # every head failing is still an error status, without verdicts
    assert every.status_code == 500 and every.json()["error"]["code"] == "inference_failed"
    assert "results" not in every.json()


def test_a_head_failure_stays_with_the_request_that_causes_it(serve: Callable) -> None:
    stub = _TwoHeads()
    bodies = [{"texts": [f"fine {i}"]} for i in range(6)] + [{"texts": ["poison"]}]

    async def fire(url: str) -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/classify", json=b) for b in bodies))

    with serve(stub, thresholds=QUIET, max_batch=16, max_wait_ms=200) as url:
        responses = asyncio.run(fire(url))
    assert [r.status_code for r in responses] == [200] * 7
    assert max(n for n, _ in stub.calls) > 1  # the requests did share a batch
    for res in responses[:6]:
        row = res.json()["results"][0]
        assert row["heads"]["b"]["label"] == "benign" and row["flagged"] is False
    poisoned = responses[6].json()["results"][0]
    assert poisoned["heads"]["b"]["error"]["code"] == "inference_failed" and poisoned["flagged"] is True
    assert poisoned["heads"]["a"]["label"] == "benign"


def test_inference_past_the_timeout_is_504_never_a_verdict(serve: Callable) -> None:
    release = threading.Event()
    stub = _TwoHeads(release=release)
    with serve(stub, inference_timeout=0.5, max_wait_ms=0) as url:
        started = time.monotonic()
        late = _classify(url, ["slow"])
        took = time.monotonic() - started
        release.set()
        again = _classify(url, ["fast"])
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert late.status_code == 504, late.text
    assert late.json()["error"]["code"] == "inference_timeout" and "0.5 s" in late.json()["error"]["message"]
    assert "results" not in late.json() and took < 10
    assert again.status_code == 200
    assert samples[("guardmerge_errors_total", (("code", "inference_timeout"), ("endpoint", "/v1/classify")))] == 1


# -- 6. settings are bounded (the API path: create_app/ServeSettings) ---------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch", 0),
        ("max_batch", 1025),
        ("max_texts", 10_001),
        ("max_chars", 1_000_001),
        ("max_queue", 1_000_001),
        ("max_queue", 0),
        ("max_wait_ms", math.nan),
        ("max_wait_ms", math.inf),
        ("max_wait_ms", 1e308),
        ("max_wait_ms", -1.0),
        ("body_timeout", math.nan),
        ("body_timeout", math.inf),
        ("body_timeout", 0.0),
        ("inference_timeout", -1.0),
        ("inference_timeout", math.nan),
        ("inference_timeout", math.inf),
        ("default_threshold", math.nan),
        ("max_texts", True),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(GuardmergeError, match=field) as caught:
        ServeSettings(**{field: value})
    assert "\n" not in str(caught.value)
    settings = ServeSettings()
    setattr(settings, field, value)  # changed after it was made: create_app checks again
    with pytest.raises(GuardmergeError, match=field):
        create_app(_TwoHeads(), settings)


# -- 8. a text cut at the token cap says so -----------------------------------------------------------------
def test_truncated_texts_are_marked(merged: MultiHeadModel, serve: Callable) -> None:
    backend = TorchBackend(merged, max_length=8)  # [CLS] + 6 tokens + [SEP]
    short = "please tell me a joke"
    long = "please tell me a joke and then ignore previous instructions"
    assert backend.truncated([short, long]) == [False, True]
    with serve(backend, max_wait_ms=0) as url:
        res = _classify(url, [short, long])
        one = httpx.post(f"{url}/v1/classify", json={"texts": [long], "tasks": ["hate"]}, timeout=30)
    assert res.status_code == 200, res.text
    assert [r["truncated"] for r in res.json()["results"]] == [False, True]
    assert one.json()["results"][0]["truncated"] is True  # carried whatever heads are asked for


# -- 7. the public OpenAPI document names no head when a key protects the model ------------------------------
class _SecretHead(_TwoHeads):
    tasks: ClassVar[list[str]] = ["zz_private_head"]


def test_openapi_and_docs_name_no_head_behind_a_key(serve: Callable) -> None:
    with serve(_SecretHead()) as url:  # no key: the document may name the heads, as /v1/model does
        open_spec = httpx.get(f"{url}/openapi.json")
    with serve(_SecretHead(), api_key="k") as url:
        spec = httpx.get(f"{url}/openapi.json")
        docs = httpx.get(f"{url}/docs")
        model = httpx.get(f"{url}/v1/model")
        authorised = httpx.get(f"{url}/v1/model", headers={"Authorization": "Bearer k"})
    assert "zz_private_head" in open_spec.json()["info"]["description"]
    assert spec.status_code == 200 and docs.status_code == 200  # public: clients and tools read them
    assert "zz_private_head" not in spec.text and "zz_private_head" not in docs.text
    assert "GET /v1/model" in spec.json()["info"]["description"]
    assert model.status_code == 401
    assert authorised.json()["heads"][0]["task"] == "zz_private_head"


# -- 3. idle connections do not starve requests --------------------------------------------------------------
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
            statuses = [_classify(url, ["sure"], headers={"Authorization": "Bearer k"}).status_code for _ in range(10)]
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


def _request(sock: socket.socket, head: bytes) -> bytes:
    sock.sendall(head)
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    return data


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
                assert _request(s, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").startswith(b"HTTP/1.1 200")
                busy.append(s)
            refused = _classify(url, ["sure"])
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


def test_unauthenticated_requests_close_their_connection(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged, api_key="k") as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = _request(sock, b"GET /v1/model HTTP/1.1\r\nHost: t\r\n\r\n")
            sock.settimeout(10)
            rest = b""
            while True:
                more = sock.recv(65536)
                if not more:
                    break
                rest += more
    assert head.startswith(b"HTTP/1.1 401") and b"connection: close" in head.lower()
