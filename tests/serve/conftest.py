"""Fixtures for the server tests: the tiny merged model (its folder and ONNX export come from
tests/conftest.py), a real uvicorn server, stub backends, and helpers that talk HTTP to a server
or read its metrics.

Test modules skip themselves (pytest.importorskip) when an optional extra is missing.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pytest

from tests.builders import MERGED_TASKS

if TYPE_CHECKING:
    from guardmerge.models.multihead import MultiHeadModel

TASKS = MERGED_TASKS  # the heads of the shared merged_dir fixture (tests/conftest.py)
JSON = {"content-type": "application/json"}
QUIET = {"a": 0.9, "b": 0.9}  # TwoHeads' zeros give p = 0.5: below these thresholds, a normal verdict does not flag


@pytest.fixture(scope="session")
def merged(merged_model: MultiHeadModel) -> MultiHeadModel:
    """The shared merged model (``merged_model``, tests/conftest.py) under the name the server tests use."""
    return merged_model


@contextmanager
def running(app: Any, timeout: float = 30.0, **config: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn (extra ``uvicorn.Config`` options: ``config``) in a background thread
    on a free 127.0.0.1 port; yield its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


@pytest.fixture
def serve() -> Callable[..., Any]:
    """``with serve(model_or_backend, uvicorn_options={...}, **settings) as url:`` runs a real server."""
    from guardmerge.serve import ServeSettings, create_app

    @contextmanager
    def start(model: Any, uvicorn_options: dict[str, Any] | None = None, **settings: Any) -> Iterator[str]:
        with running(create_app(model, ServeSettings(**settings)), **(uvicorn_options or {})) as url:
            yield url

    return start


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def classify(url: str, body: Any, **kw: Any) -> Any:
    """POST ``body`` to ``url``'s /v1/classify."""
    import httpx

    return httpx.post(f"{url}/v1/classify", json=body, timeout=30, **kw)


def classify_texts(url: str, texts: list[str], **kw: Any) -> Any:
    """POST ``{"texts": texts}`` to ``url``'s /v1/classify."""
    return classify(url, {"texts": texts}, **kw)


def error_count(url: str, code: str, endpoint: str = "/v1/classify", **kw: Any) -> float:
    """How many ``code`` errors ``url``'s /metrics has counted on ``endpoint``."""
    import httpx

    samples = metric_samples(httpx.get(f"{url}/metrics", **kw).text)
    return samples.get(("guardmerge_errors_total", (("code", code), ("endpoint", endpoint))), 0.0)


def read_response(sock: socket.socket) -> bytes:
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


def send_request(sock: socket.socket, head: bytes) -> bytes:
    """Send ``head`` on ``sock``; the response head that comes back (up to its blank line)."""
    sock.sendall(head)
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    return data


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace uvicorn.run: record the app and its arguments instead of serving."""
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    return seen


class TwoHeads:
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


class Scores:
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
