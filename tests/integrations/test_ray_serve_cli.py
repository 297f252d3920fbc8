"""``guardmerge serve --ray``: the README's example, run as written (a real local Ray cluster
started by the command, two replicas), answers /v1/classify and stops cleanly on SIGTERM.
Marked ``ray`` (CI runs it in its own step: ``pytest -m ray``)."""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.ray
pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]


def test_the_readmes_ray_example_serves_and_stops(merged_dir: Path) -> None:
    block = (ROOT / "README.md").read_text().split("<!-- ray-example:start -->", 1)[1]
    block = block.split("<!-- ray-example:end -->", 1)[0].split("```bash\n", 1)[1].split("```", 1)[0]
    serve_line, curl_line = block.strip().splitlines()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = shlex.split(serve_line.replace("guardmerge-demo/merged", str(merged_dir)).replace("8000", str(port)))
    args = [a for a in args if a not in ("--threshold", "emotion=off")]  # the tiny model has no emotion head
    assert args[:2] == ["guardmerge", "serve"] and "--ray" in args
    proc = subprocess.Popen([sys.executable, "-m", "guardmerge.cli", *args[1:]], stderr=subprocess.PIPE, text=True)
    try:
        body = json.loads(shlex.split(curl_line)[-1])
        deadline = time.monotonic() + 400  # two replicas import torch and load; slow on a busy 2-core machine
        answer = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json=body, timeout=30)
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert answer is not None and answer.status_code == 200, proc.stderr.read() if proc.poll() is not None else ""
        assert len(answer.json()["results"]) == 1 and "injection" in answer.json()["results"][0]["heads"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # SIGTERM stops it. Known defect: Ray's core may catch SIGTERM first and end the process with
    # SIGABRT (-6) instead of 143 after the application is deleted; either way nothing serves any more
    assert proc.returncode in (128 + signal.SIGTERM, -signal.SIGABRT)
    # nothing serves any more: after a clean stop the command returns only once the port is closed;
    # after an abort, Ray's proxy (a worker whose raylet died with the process) exits within seconds
    closed_by = time.monotonic() + (5 if proc.returncode == 128 + signal.SIGTERM else 60)
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        except httpx.TransportError:
            break
        assert time.monotonic() < closed_by, f"port {port} still serves after the command ended ({proc.returncode})"
        time.sleep(0.5)
