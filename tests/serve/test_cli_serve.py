"""``guardmerge serve``: options reach the app; the real command answers HTTP (slow)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

from guardmerge.cli import app as cli_app  # noqa: E402
from guardmerge.errors import GuardmergeError  # noqa: E402

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace uvicorn.run: record the app and its arguments instead of serving."""
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    return seen


def test_serve_options_reach_the_app(merged_dir: Path, captured: dict[str, Any],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDMERGE_API_KEY", "from-env")
    res = runner.invoke(cli_app, [
        "serve", str(merged_dir), "--port", "9", "--threshold", "hate=0.8", "--threshold", "sentiment=off",
        "--max-batch", "4", "--max-wait-ms", "2", "--max-texts", "10", "--max-chars", "50", "--no-access-log",
    ])
    assert res.exit_code == 0, res.output
    settings = captured["app"].state.settings
    assert captured["host"] == "127.0.0.1" and captured["port"] == 9 and captured["access_log"] is False
    assert settings.api_key == "from-env"
    assert settings.thresholds == {"hate": 0.8, "sentiment": None}
    assert (settings.max_batch, settings.max_wait_ms, settings.max_texts, settings.max_chars) == (4, 2.0, 10, 50)
    assert captured["app"].state.backend.name == "torch"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "spam=0.5"], "unknown task"),
        (["--threshold", "hate=2"], "outside"),
        (["--backend", "tf"], "unknown backend"),
        (["--max-texts", "0"], "max_texts"),
        (["--default-threshold", "1.5"], "outside"),
    ],
)
def test_serve_bad_options_raise_one_line_errors(merged_dir: Path, captured: dict[str, Any],
                                                 args: list[str], message: str) -> None:
    res = runner.invoke(cli_app, ["serve", str(merged_dir), *args])
    assert isinstance(res.exception, GuardmergeError) and message in str(res.exception)
    assert "app" not in captured


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command_answers_http(merged_dir: Path) -> None:
    port = _free_port()
    env = {**os.environ, "GUARDMERGE_API_KEY": "k"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "guardmerge.cli", "-q", "serve", str(merged_dir), "--port", str(port), "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        res = httpx.post(f"{url}/v1/classify", json={"texts": ["sure"]}, headers={"Authorization": "Bearer k"})
        assert res.status_code == 200 and set(res.json()["results"][0]["heads"]) == {"hate", "injection", "sentiment"}
        assert httpx.post(f"{url}/v1/classify", json={"texts": ["sure"]}).status_code == 401
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode in (0, -15)  # uvicorn shuts down gracefully, then re-raises SIGTERM


def test_serve_without_the_extra_explains(merged_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    res = runner.invoke(cli_app, ["serve", str(merged_dir)])
    assert isinstance(res.exception, GuardmergeError) and "guardmerge[serve]" in str(res.exception)
