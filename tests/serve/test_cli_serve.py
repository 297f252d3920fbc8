"""``guardmerge serve``: options reach the app; the real command answers HTTP (slow)."""

from __future__ import annotations

import logging
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

import uvicorn  # noqa: E402

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


def test_serve_options_reach_the_app(
    merged_dir: Path, captured: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARDMERGE_API_KEY", "from-env")
    res = runner.invoke(
        cli_app,
        [
            "serve",
            str(merged_dir),
            "--port",
            "9",
            "--threshold",
            "hate=0.8",
            "--threshold",
            "sentiment=off",
            "--max-batch",
            "4",
            "--max-wait-ms",
            "2",
            "--max-texts",
            "10",
            "--max-chars",
            "50",
            "--no-access-log",
        ],
    )
    assert res.exit_code == 0, res.output
    settings = captured["app"].state.settings
    assert captured["host"] == "127.0.0.1" and captured["port"] == 9 and captured["access_log"] is False
    assert settings.api_key == "from-env"
    assert settings.thresholds == {"hate": 0.8, "sentiment": None}
    assert (settings.max_batch, settings.max_wait_ms, settings.max_texts, settings.max_chars) == (4, 2.0, 10, 50)
    assert captured["app"].state.backend.name == "torch"
    # connection limits reach uvicorn with their defaults; the cap is the protocol's, not uvicorn's
    assert captured["timeout_keep_alive"] == 5.0 and "limit_concurrency" not in captured
    assert captured["http"].header_timeout == 10.0 and captured["http"].max_connections == 512
    assert settings.body_timeout == 30.0 and settings.inference_timeout == 30.0


def test_serve_connection_limits_reach_uvicorn(merged_dir: Path, captured: dict[str, Any]) -> None:
    res = runner.invoke(
        cli_app,
        [
            "serve",
            str(merged_dir),
            "--header-timeout",
            "2.5",
            "--body-timeout",
            "7",
            "--keep-alive-timeout",
            "3",
            "--max-connections",
            "40",
            "--inference-timeout",
            "12",
        ],
    )
    assert res.exit_code == 0, res.output
    assert captured["timeout_keep_alive"] == 3.0 and captured["http"].max_connections == 40
    assert captured["http"].header_timeout == 2.5
    assert captured["app"].state.settings.body_timeout == 7.0
    assert captured["app"].state.settings.inference_timeout == 12.0
    config = uvicorn.Config(captured["app"], **{k: v for k, v in captured.items() if k != "app"})
    config.load()  # the options form a valid uvicorn configuration with our protocol class
    assert config.http_protocol_class is captured["http"] and config.limit_concurrency is None


@pytest.mark.parametrize("env", [None, "", "  "])
def test_serve_refuses_an_empty_api_key(
    merged_dir: Path, captured: dict[str, Any], monkeypatch: pytest.MonkeyPatch, env: str | None
) -> None:
    if env is None:
        monkeypatch.delenv("GUARDMERGE_API_KEY", raising=False)
        args = ["--api-key", ""]
    else:
        monkeypatch.setenv("GUARDMERGE_API_KEY", env)
        args = []
    res = runner.invoke(cli_app, ["serve", str(merged_dir), *args])
    assert isinstance(res.exception, GuardmergeError), res.output
    assert "empty or blank" in str(res.exception) and "\n" not in str(res.exception)
    assert "app" not in captured


def test_serve_empty_api_key_exits_2_with_one_line(merged_dir: Path) -> None:
    env = {**os.environ, "GUARDMERGE_API_KEY": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "guardmerge.cli", "serve", str(merged_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "GUARDMERGE_API_KEY" in lines[0]


@pytest.mark.parametrize(
    ("host", "key", "warned"), [("0.0.0.0", None, True), ("127.0.0.1", None, False), ("0.0.0.0", "k", False)]
)
def test_serve_warns_without_key_beyond_loopback(
    merged_dir: Path,
    captured: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    host: str,
    key: str | None,
    warned: bool,
) -> None:
    monkeypatch.delenv("GUARDMERGE_API_KEY", raising=False)
    args = ["--api-key", key] if key else []
    with caplog.at_level(logging.WARNING, logger="guardmerge"):
        res = runner.invoke(cli_app, ["serve", str(merged_dir), "--host", host, *args])
    assert res.exit_code == 0, res.output
    hits = [r for r in caplog.records if "without an API key" in r.getMessage()]
    assert bool(hits) == warned


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "spam=0.5"], "unknown task"),
        (["--threshold", "hate=2"], "outside"),
        (["--backend", "tf"], "unknown backend"),
        (["--max-texts", "0"], "max_texts"),
        (["--default-threshold", "1.5"], "outside"),
        (["--header-timeout", "0"], "header-timeout"),
        (["--keep-alive-timeout", "-1"], "keep-alive-timeout"),
        (["--max-connections", "0"], "max-connections"),
        (["--body-timeout", "0"], "body_timeout"),
        (["--api-key", " k "], "whitespace"),
    ],
)
def test_serve_bad_options_raise_one_line_errors(
    merged_dir: Path, captured: dict[str, Any], args: list[str], message: str
) -> None:
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
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
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
