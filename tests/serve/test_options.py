"""The options of ``guardmerge serve``: declared once (ServerOptions, ServeSettings), they reach the app and
uvicorn; bad ones are refused at start-up with one line (exit 2)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from guardmerge import cli  # noqa: E402
from guardmerge.cli import app as cli_app  # noqa: E402
from guardmerge.errors import GuardmergeError  # noqa: E402
from guardmerge.serve.options import (  # noqa: E402
    OPTION_TYPES,
    ServerOptions,
    check_flags,
    from_flags,
    option_parameters,
    serve_options,
)
from guardmerge.serve.settings import ServeSettings  # noqa: E402

runner = CliRunner()


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


def _defaults() -> dict[str, Any]:
    return {p.name: p.default for p in option_parameters(*OPTION_TYPES)}


def test_one_parameter_per_field_with_the_field_default() -> None:
    import dataclasses

    params = option_parameters(*OPTION_TYPES)
    names = [f.name for cls in OPTION_TYPES for f in dataclasses.fields(cls)]
    assert [p.name for p in params] == names and len(set(names)) == len(names)  # no option declared twice
    assert all(p.kind is p.KEYWORD_ONLY for p in params)
    defaults = _defaults()
    assert defaults["host"] == "127.0.0.1" and defaults["port"] == 8000 and defaults["max_texts"] == 64
    assert defaults["thresholds"] is None and defaults["api_key"] is None  # factories: not given
    assert (
        from_flags(ServeSettings, defaults) == ServeSettings()
        and from_flags(ServerOptions, defaults) == ServerOptions()
    )


def test_help_lists_every_option_with_its_help_and_default() -> None:
    import dataclasses

    res = runner.invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for cls in OPTION_TYPES:
        for f in dataclasses.fields(cls):
            how = f.metadata["cli"]
            flag = how.name or "--" + f.name.replace("_", "-")
            assert flag in text and " ".join(how.help.split())[:40] in text, f.name
    for shown in ("[default: 127.0.0.1]", "[default: 8000]", "[default: 4096]", "[default: first]", "[default: 30.0]"):
        assert shown in text
    assert "--no-access-log" in text and "GUARDMERGE_API_KEY" in text and "MODEL" in text.upper()


def test_serve_options_replace_the_keywords_of_a_command() -> None:
    import inspect

    def command(model: str, **flags: Any) -> dict[str, Any]:
        return flags

    decorated = serve_options(command)
    signature = inspect.signature(decorated)
    assert list(signature.parameters)[:3] == ["model", "host", "port"]
    assert "flags" not in signature.parameters and "inference_timeout" in signature.parameters
    assert decorated("m", port=1) == {"port": 1}  # the function itself is unchanged


def test_from_flags_parses_each_field() -> None:
    flags = {**_defaults(), "thresholds": ["hate=0.8"], "benign": ["t=a, b"], "flag_entities": None, "max_texts": 9}
    settings = from_flags(ServeSettings, flags)
    assert settings.thresholds == {"hate": 0.8} and settings.benign == {"t": ["a", "b"]} and settings.max_texts == 9
    assert settings.flag_entities == {}
    with pytest.raises(GuardmergeError, match="max_texts"):
        from_flags(ServeSettings, {**flags, "max_texts": 0})


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"host": "bad host"}, "--host 'bad host' is not an IP address or a host name"),
        ({"host": " "}, "for every address"),
        ({"host": "a" * 64}, "--host"),
        ({"port": 0}, "--port must be from 1 to 65535 (got 0)"),
        ({"threads": 1025}, "--threads must be from 1 to 1024"),
        ({"max_length": 0}, "--max-length must be from 1 to 1000000 tokens"),
    ],
)
def test_server_options_are_checked(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(GuardmergeError) as caught:
        ServerOptions(**change).check()
    assert needle in str(caught.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "::", "[::1]", "0.0.0.0", "localhost", "guard.example.com", "a-b.c."])
def test_good_hosts_pass(host: str) -> None:
    ServerOptions(host=host, port=65535, threads=1024, max_length=1_000_000).check()


def test_check_flags_refuses_the_default_threshold_first() -> None:
    flags = {**_defaults(), "default_threshold": 1.5, "port": 0}
    with pytest.raises(GuardmergeError, match=r"^--default-threshold 1.5 is outside \[0, 1\]$"):
        check_flags(flags)
    with pytest.raises(GuardmergeError, match="--port"):
        check_flags({**flags, "default_threshold": 0.5})
    assert check_flags({**flags, "default_threshold": 0.5, "port": 80}) == ServerOptions(port=80)
