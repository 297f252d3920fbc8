"""guardmerge on Ray Serve, for real: a local Ray cluster started by the test, two replicas of the
tiny merged model; answers equal the single-process server's, errors are the same, and a replica
killed under load never turns into a benign verdict. Slow (Ray starts in ~20 s): marked ``ray``,
run by CI in its own step (``pytest -m ray``)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardmerge.errors import GuardmergeError
from guardmerge.serve import ServeSettings, create_app
from tests.builders import TEXTS
from tests.serve.conftest import running

pytestmark = pytest.mark.ray
serve = pytest.importorskip("ray.serve")

SETTINGS = {"max_texts": 16, "max_chars": 500, "thresholds": {"hate": 0.0, "sentiment": None}}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(merged_dir: Path) -> Iterator[str]:
    """Two replicas of the tiny merged model on a local Ray cluster; yields the proxy's URL."""
    import ray

    from guardmerge.integrations.ray_serve import deployment, run

    port = _port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        app = deployment(merged_dir, replicas=2, settings=ServeSettings(**SETTINGS), cpus_per_replica=0.5)
        run(app, port=port)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(merged_dir: Path) -> Iterator[str]:
    """The single-process server on the same model and settings."""
    import guardmerge

    with running(create_app(guardmerge.load(str(merged_dir)), ServeSettings(**SETTINGS))) as url:
        yield url


def _classify(url: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json=body, timeout=60, **kw)


def test_ray_replicas_answer_as_the_single_process_server(cluster: str, single: str) -> None:
    body = {"texts": list(TEXTS)}
    got, want = _classify(cluster, body), _classify(single, body)
    assert got.status_code == want.status_code == 200
    assert got.json() == want.json()
    for _ in range(6):  # both replicas (Ray routes by load): the same verdicts every time
        assert (
            _classify(cluster, {"texts": [TEXTS[0]], "tasks": ["injection"]}).json()
            == _classify(single, {"texts": [TEXTS[0]], "tasks": ["injection"]}).json()
        )
    assert httpx.get(f"{cluster}/v1/model").json() == httpx.get(f"{single}/v1/model").json()
    v2 = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": list(TEXTS[:2])}]}
    r2 = httpx.post(f"{cluster}/v2/models/guardmerge/infer", json=v2, timeout=60)
    assert r2.status_code == 200 and r2.json() == httpx.post(f"{single}/v2/models/guardmerge/infer", json=v2).json()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"texts": ["a"] * 17}, 413, "too_many_texts"),
        ({"texts": ["x" * 501]}, 413, "text_too_long"),
        ({"texts": ["a"], "tasks": ["nope"]}, 400, "unknown_task"),
        ({"text": "a"}, 422, "invalid_request"),
    ],
)
def test_ray_gives_the_same_errors(cluster: str, single: str, body: Any, status: int, code: str) -> None:
    got, want = _classify(cluster, body), _classify(single, body)
    assert got.status_code == want.status_code == status
    assert got.json()["error"]["code"] == want.json()["error"]["code"] == code


def test_a_replica_killed_under_load_never_gives_a_benign_verdict(cluster: str) -> None:
    import ray

    expected = _classify(cluster, {"texts": [TEXTS[0]]}).json()["results"]
    assert expected[0]["flagged"]  # hate's threshold 0: every text is flagged
    stop = threading.Event()
    seen: list[tuple[int, Any]] = []

    def load() -> None:
        while not stop.is_set():
            try:
                r = _classify(cluster, {"texts": [TEXTS[0]]})
                seen.append((r.status_code, r.json() if r.status_code == 200 else None))
            except httpx.HTTPError as exc:
                seen.append((-1, str(exc)))

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(load)
        time.sleep(2)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
        assert len(replicas) == 2
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
        time.sleep(4)
        stop.set()
    answered = [body for status, body in seen if status == 200]
    assert answered and all(_verdicts(body["results"]) == _verdicts(expected) for body in answered)  # never another
    deadline = time.monotonic() + 60  # the others keep answering (and Ray Serve replaces the dead one)
    while _classify(cluster, {"texts": [TEXTS[0]]}).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(1)


def _verdicts(results: list[dict[str, Any]]) -> list[Any]:
    """Each text's flag and each head's label and flag (scores move by ~1e-7 with the batch's padding)."""
    return [(r["flagged"], {t: (h.get("label"), h["flagged"]) for t, h in r["heads"].items()}) for r in results]


def test_deployment_refuses_a_missing_folder(tmp_path: Path) -> None:
    from guardmerge.integrations.ray_serve import deployment

    with pytest.raises(GuardmergeError, match="does not exist"):
        deployment(tmp_path / "nowhere")
