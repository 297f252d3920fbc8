"""``guardmerge serve`` as a process: flags refused at start-up with one line (exit 2), and a temporary ONNX
export removed whatever stops the server (SIGTERM, SIGINT at any point; SIGKILL: by the next start)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

from guardmerge import cli  # noqa: E402
from guardmerge.serve.backends import TEMP_EXPORT_NAME, load_backend  # noqa: E402


# -- 6. flags ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--threads", "-1"], "--threads"),
        (["--threads", "0"], "--threads"),
        (["--port", "99999"], "--port"),
        (["--port", "-1"], "--port"),
        (["--host", "bad host"], "--host"),
        (["--host", ""], "--host"),
        (["--max-length", "-5"], "--max-length"),
        (["--max-length", "2"], "minimum is 3"),
        (["--max-wait-ms", "nan"], "--max-wait-ms"),
        (["--max-wait-ms", "inf"], "--max-wait-ms"),
        (["--max-wait-ms", "1e308"], "--max-wait-ms"),
        (["--max-batch", "100000"], "--max-batch"),
        (["--max-texts", "1000000"], "--max-texts"),
        (["--max-chars", "100000000"], "--max-chars"),
        (["--max-queue", "1000000000"], "--max-queue"),
        (["--body-timeout", "nan"], "--body-timeout"),
        (["--body-timeout", "inf"], "--body-timeout"),
        (["--inference-timeout", "0"], "--inference-timeout"),
        (["--inference-timeout", "nan"], "--inference-timeout"),
        (["--header-timeout", "inf"], "--header-timeout"),
        (["--keep-alive-timeout", "inf"], "--keep-alive-timeout"),
        (["--max-connections", "10000000"], "--max-connections"),
    ],
)
def test_bad_serve_flags_exit_2_with_one_error_line(
    merged_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    needle: str,
) -> None:
    import uvicorn

    def never(*a: object, **k: object) -> None:
        raise AssertionError("the server started with a bad flag")

    monkeypatch.setattr(uvicorn, "run", never)
    monkeypatch.delenv("GUARDMERGE_API_KEY", raising=False)
    monkeypatch.setattr(sys, "argv", ["guardmerge", "-q", "serve", str(merged_dir), *args])
    with pytest.raises(SystemExit) as caught:
        cli.main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert caught.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


# -- 4. the temporary ONNX export never outlives the server --------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = _free_port()
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
        args = [str(flag), "serve", str(merged_dir), "--backend", "onnx", "--port", str(_free_port())]
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
    port = _free_port()
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
