"""Fixtures for the server tests: a tiny merged model folder and a real uvicorn server.

Test modules skip themselves (pytest.importorskip) when an optional extra is missing.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from guardmerge.models.multihead import MultiHeadModel
from tests.builders import MERGED_TASKS

TASKS = MERGED_TASKS  # the heads of the shared merged_dir fixture (tests/conftest.py)


@pytest.fixture(scope="session")
def merged(merged_dir: Path) -> MultiHeadModel:
    import guardmerge

    return guardmerge.load(str(merged_dir))


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
