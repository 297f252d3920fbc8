"""The options of ``guardmerge serve``, each declared once, as a dataclass field with its :class:`Flag`:
:class:`ServerOptions` (the command line's own: address, backend, connections) and
:class:`~guardmerge.serve.settings.ServeSettings` (the app's limits and flagging).

:func:`serve_options` gives a typer command a keyword parameter per field (name, type, default, help,
environment variable from the field and its :class:`Flag`); :func:`from_flags` turns the parsed
values back into the dataclass. Like the settings, this module imports neither FastAPI nor numpy.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import typer

from guardmerge.errors import GuardmergeError
from guardmerge.serve.settings import CLI, Flag, ServeSettings, cli_flag

__all__ = [
    "MAX_PORT",
    "MAX_THREADS",
    "MAX_TOKENS",
    "OPTION_TYPES",
    "ServerOptions",
    "check_flags",
    "from_flags",
    "option_parameters",
    "serve_options",
]

MAX_PORT = 65535
MAX_THREADS = 1024
MAX_TOKENS = 1_000_000

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
"""One label of a host name."""


@dataclass(frozen=True)
class ServerOptions:
    """The options of ``guardmerge serve`` that are not :class:`ServeSettings`: where and how it runs.

    :meth:`check` refuses a bad host, port, thread count or token limit; the connection limits are
    checked by :func:`~guardmerge.serve.server.uvicorn_limits`.
    """

    host: str = field(default="127.0.0.1", metadata=cli_flag("Address to listen on (127.0.0.1: this machine only)."))
    port: int = field(default=8000, metadata=cli_flag("TCP port."))
    backend: str = field(
        default="torch",
        metadata=cli_flag("torch, or onnx (onnxruntime; a merged folder is exported to a temporary folder first)."),
    )
    max_length: int | None = field(
        default=None, metadata=cli_flag("Tokens per text (default: the model's maximum, 512 at most).")
    )
    threads: int | None = field(default=None, metadata=cli_flag("Inference threads (default: the runtime's choice)."))
    access_log: bool = field(default=True, metadata=cli_flag("Log every request."))
    header_timeout: float = field(
        default=10.0,
        metadata=cli_flag(
            "Seconds a connection has to send a complete request head (from opening, or from the previous "
            "response); then it is closed."
        ),
    )
    keep_alive_timeout: float = field(
        default=5.0, metadata=cli_flag("Seconds an idle keep-alive connection stays open.")
    )
    max_connections: int = field(
        default=512,
        metadata=cli_flag(
            "Most concurrent connections: beyond it the oldest connection that has sent no request yet is "
            "closed, or, when every connection has sent one, the new one is refused (503; /healthz is answered)."
        ),
    )

    ray: str | None = field(
        default=None,
        metadata=cli_flag(
            "Serve on Ray Serve replicas instead of one process: 'local' starts a Ray cluster on this machine, "
            "'auto' or ray://HOST:10001 joins one (needs the extra named ray-serve)."
        ),
    )
    replicas: int = field(default=1, metadata=cli_flag("With --ray: replicas (the lower bound with --max-replicas)."))
    max_replicas: int | None = field(
        default=None, metadata=cli_flag("With --ray: autoscale from --replicas up to this many replicas.")
    )

    def check(self) -> None:
        """Raise :class:`GuardmergeError` (one line, naming the flag) for a value out of range."""
        if not 1 <= self.replicas <= MAX_THREADS:
            raise GuardmergeError(f"--replicas must be from 1 to {MAX_THREADS} (got {self.replicas})")
        if self.max_replicas is not None and not self.replicas <= self.max_replicas <= MAX_THREADS:
            raise GuardmergeError(
                f"--max-replicas must be from --replicas ({self.replicas}) to {MAX_THREADS} (got {self.max_replicas})"
            )
        if self.ray is None and (self.replicas != 1 or self.max_replicas is not None):
            raise GuardmergeError("--replicas and --max-replicas need --ray (local, auto or ray://HOST:PORT)")
        name = self.host.strip()
        try:
            ipaddress.ip_address(name.strip("[]"))
            is_address = True
        except ValueError:
            is_address = False
        if not is_address and not (
            name == self.host and len(name) <= 253 and re.fullmatch(rf"{_LABEL}(?:\.{_LABEL})*\.?", name)
        ):
            every = " (for every address, give 0.0.0.0 or ::)" if not name else ""
            raise GuardmergeError(f"--host {self.host!r} is not an IP address or a host name{every}")
        if not 1 <= self.port <= MAX_PORT:
            raise GuardmergeError(f"--port must be from 1 to {MAX_PORT} (got {self.port})")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise GuardmergeError(f"--threads must be from 1 to {MAX_THREADS} (got {self.threads})")
        if self.max_length is not None and not 1 <= self.max_length <= MAX_TOKENS:
            raise GuardmergeError(f"--max-length must be from 1 to {MAX_TOKENS} tokens (got {self.max_length})")


OPTION_TYPES: tuple[type, ...] = (ServerOptions, ServeSettings)
"""The dataclasses whose fields are the options of ``guardmerge serve``, in the order of its help."""

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


def _flags_of(cls: type) -> list[tuple[dataclasses.Field[Any], Flag]]:
    return [(f, f.metadata[CLI]) for f in dataclasses.fields(cls)]


def option_parameters(*types: type) -> list[inspect.Parameter]:
    """A keyword-only parameter per field of ``types`` (dataclasses whose fields carry a :class:`Flag`),
    annotated with its ``typer.Option``; a field with a factory defaults to None (not given)."""
    params = []
    for cls in types:
        hints = typing.get_type_hints(cls)
        for f, how in _flags_of(cls):
            option = typer.Option(*([how.name] if how.name else []), help=how.help, envvar=how.envvar)
            kind = how.cli_type if how.cli_type is not None else hints[f.name]
            default = None if f.default is dataclasses.MISSING else f.default
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
                )
            )
    return params


def serve_options(command: _F) -> _F:
    """``command`` with a keyword parameter per option of :data:`OPTION_TYPES` in place of its
    ``**flags`` (which receive them), for typer: decorate it below ``@app.command()``."""
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params = [*kept, *option_parameters(*OPTION_TYPES)]
    command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return command


def from_flags(cls: type[_T], flags: Mapping[str, Any]) -> _T:
    """A ``cls`` (one of :data:`OPTION_TYPES`) from the command's parsed flags, each parsed by its :class:`Flag`."""
    values = {f.name: how.parse(flags[f.name]) if how.parse else flags[f.name] for f, how in _flags_of(cls)}
    return cls(**values)


def check_flags(flags: Mapping[str, Any]) -> ServerOptions:
    """The :class:`ServerOptions` of the parsed flags, checked, after the default threshold (one-line errors)."""
    threshold = flags["default_threshold"]
    if not 0.0 <= threshold <= 1.0:
        raise GuardmergeError(f"--default-threshold {threshold} is outside [0, 1]")
    options = from_flags(ServerOptions, flags)
    options.check()
    return options
