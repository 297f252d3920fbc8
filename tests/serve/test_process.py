"""``guardmerge serve`` as a process: the API key from the flag or the environment, signals (SIGTERM, SIGINT at
any point) that unwind through the clean-up so a temporary ONNX export is removed (SIGKILL: by the next start)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

from typer.testing import CliRunner  # noqa: E402

from guardmerge.cli import app as cli_app  # noqa: E402
from guardmerge.errors import GuardmergeError  # noqa: E402
from guardmerge.serve.backends import TEMP_EXPORT_NAME, load_backend  # noqa: E402
from guardmerge.serve.process import (  # noqa: E402
    STOP_SIGNALS,
    Stopped,
    end_by_signal,
    hold_signals,
    restore_signals,
    serve_until_stopped,
    stop_on_signals,
)
from tests.serve.conftest import free_port  # noqa: E402

runner = CliRunner()


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


@pytest.mark.slow
def test_serve_command_answers_http(merged_dir: Path) -> None:
    port = free_port()
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


def _exports(tmpdir: Path) -> list[Path]:
    return sorted(p for p in tmpdir.iterdir() if "guardmerge" in p.name)


_SLOW_EXPORT = """
import pathlib, sys, time
import guardmerge.export.onnx as exporter
flag, real = pathlib.Path(sys.argv[1]), exporter.export_onnx
def slow(model, out, *args, **kwargs):
    flag.write_text(str(out))  # the temporary folder exists: the export has started
    time.sleep(120)
    return real(model, out, *args, **kwargs)
exporter.export_onnx = slow
sys.argv = ["guardmerge", "-q", *sys.argv[2:]]
from guardmerge.cli import main
main()
"""


def _start(tmpdir: Path, args: list[str], script: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    env.pop("GUARDMERGE_API_KEY", None)
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "guardmerge.cli", "-q", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(condition: object, proc: subprocess.Popen[str], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert proc.poll() is None, f"the server ended before {what}: {proc.stdout.read() if proc.stdout else ''}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_sigterm_after_start_removes_the_temporary_export(merged_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = _start(tmp_path, ["serve", str(merged_dir), "--backend", "onnx", "--port", str(port), "--threads", "1"])
    try:
        _wait(lambda: _healthy(f"http://127.0.0.1:{port}"), proc, "the server answered")
        made = _exports(tmp_path)
        assert len(made) == 1 and made[0].name.startswith(f".{TEMP_EXPORT_NAME}.tmp-")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGTERM  # the process still ends by the signal, after cleaning up
    assert _exports(tmp_path) == []


def test_a_signal_during_the_export_removes_it(merged_dir: Path, tmp_path: Path) -> None:
    for sig, code in ((signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)):  # 130: as Ctrl-C
        flag = tmp_path / f"exporting-{sig}"
        tmpdir = tmp_path / f"tmp-{sig}"
        tmpdir.mkdir()
        args = [str(flag), "serve", str(merged_dir), "--backend", "onnx", "--port", str(free_port())]
        proc = _start(tmpdir, args, script=_SLOW_EXPORT)
        try:
            _wait(flag.exists, proc, "the export started")
            assert len(_exports(tmpdir)) == 1
            proc.send_signal(sig)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        assert proc.returncode == code, signal.Signals(sig).name
        assert _exports(tmpdir) == [], signal.Signals(sig).name


def test_an_export_left_by_a_killed_server_is_removed_by_the_next_start(
    merged_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    proc = _start(tmp_path, ["serve", str(merged_dir), "--backend", "onnx", "--port", str(port), "--threads", "1"])
    try:
        _wait(lambda: _healthy(f"http://127.0.0.1:{port}"), proc, "the server answered")
    finally:
        proc.kill()  # SIGKILL: nothing runs in the process
        proc.wait(30)
    left = _exports(tmp_path)
    assert len(left) == 1  # SIGKILL leaves it...
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    backend = load_backend(merged_dir, "onnx", threads=1)  # ...and the next start removes it
    try:
        now = _exports(tmp_path)
        assert left[0] not in now and len(now) == 1
    finally:
        backend.close()
    assert _exports(tmp_path) == []


class _Backend:
    def __init__(self, on_close: Callable[[], None] | None = None) -> None:
        self.closed = 0
        self.on_close = on_close

    def close(self) -> None:
        self.closed += 1
        if self.on_close is not None:
            self.on_close()


def _handlers() -> list[Any]:
    return [signal.getsignal(s) for s in STOP_SIGNALS]


def test_serve_until_stopped_closes_the_backend_and_restores_the_handlers() -> None:
    before = _handlers()
    backend = _Backend()
    seen: list[Any] = []

    def serve(b: Any) -> None:
        seen.append(b)
        assert _handlers() != before  # SIGTERM and SIGINT now raise Stopped

    serve_until_stopped(lambda: backend, serve)
    assert seen == [backend] and backend.closed == 1 and _handlers() == before


def test_a_stop_signal_while_serving_ends_as_the_signal_asks() -> None:
    before = _handlers()
    backend = _Backend()

    def serve(_: Any) -> None:
        raise Stopped(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):  # SIGINT ends as Ctrl-C does
        serve_until_stopped(lambda: backend, serve)
    assert backend.closed == 1 and _handlers() == before


def test_a_signal_during_the_clean_up_waits_for_it() -> None:
    before = _handlers()
    backend = _Backend(on_close=lambda: os.kill(os.getpid(), signal.SIGINT))  # held: the close finishes
    with pytest.raises(KeyboardInterrupt):
        serve_until_stopped(lambda: backend, lambda _: None)
    assert backend.closed == 1 and _handlers() == before


def test_a_failure_to_open_the_backend_is_raised_after_restoring_the_handlers() -> None:
    before = _handlers()

    def fail() -> Any:
        raise GuardmergeError("no such model")

    with pytest.raises(GuardmergeError, match="no such model"):
        serve_until_stopped(fail, lambda _: None)
    assert _handlers() == before


def test_signal_helpers() -> None:
    before = _handlers()
    previous = stop_on_signals()
    try:
        with pytest.raises(Stopped) as caught:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at once; never reached
        assert caught.value.signum == signal.SIGINT
        pending: list[int] = []
        hold_signals(pending)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert pending == [signal.SIGINT]
    finally:
        restore_signals(previous)
    assert _handlers() == before
    with pytest.raises(KeyboardInterrupt):
        end_by_signal(signal.SIGINT)


def test_handlers_are_only_set_on_the_main_thread() -> None:
    found: list[Any] = []
    worker = threading.Thread(target=lambda: found.append(stop_on_signals()))
    worker.start()
    worker.join(10)
    assert found == [{}]
