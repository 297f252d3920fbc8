"""Connection-level limits for ``guardmerge serve`` (uvicorn): header timeout, keep-alive, connection cap.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) but not the time a client
may take to send a request head, and its own connection cap (``limit_concurrency``) counts idle
connections too: a client holding enough connections that never send a byte makes every other
request, ``/healthz`` included, get a plain 503 that the app never sees. The protocol made by
:func:`guarded_protocol` replaces both:

- **Header timeout.** A connection that has not sent a complete request head within
  ``header_timeout`` seconds of opening (or of the end of its previous response) is closed.
- **Connection cap.** When a new connection would make more than ``max_connections``, the oldest
  connection that has not yet sent a complete request head (idle since it opened) is closed to
  make room. Only when there is none (every connection has sent a request) is the new one
  refused: its request gets 503 ``overloaded`` (JSON, counted in ``/metrics``, ``Retry-After``)
  and the connection is closed, except ``/healthz``, which is always answered. Idle connections
  therefore never starve clients that send requests, so no separate, shorter first-byte timeout
  is needed: an idle connection is only kept while there is room for it.

Unauthenticated requests are answered 401 with ``Connection: close`` by the app's gate, so a
client without the key cannot hold connections open by sending requests either. The body's own
deadline is enforced by the app (``ServeSettings.body_timeout``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from guardmerge.errors import GuardmergeError

log = logging.getLogger(__name__)

OVER_CAPACITY = "guardmerge.over_capacity"
"""Key of ``scope["extensions"]`` set on a request that arrived beyond the connection cap."""
ALWAYS_ANSWERED = frozenset({"/healthz"})
"""Paths answered even on a connection beyond the cap."""
MAX_SECONDS = 3600.0
MAX_CONNECTIONS = 100_000

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine (``localhost``, 127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _check_seconds(flag: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SECONDS:
        raise GuardmergeError(f"{flag} must be a number of seconds > 0 and <= {MAX_SECONDS:g} (got {value!r})")


def _check_connections(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONNECTIONS:
        raise GuardmergeError(f"--max-connections must be an integer from 1 to {MAX_CONNECTIONS} (got {value!r})")


class _HeaderTimeout:
    """Mixin for a uvicorn HTTP protocol: the header timeout and the connection cap (module docstring)."""

    header_timeout: float = 10.0
    max_connections: int | None = None
    _header_timer: asyncio.TimerHandle | None = None
    _opened: float = 0.0
    _over_capacity: bool = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._opened = self._loop().time()
        self._arm_header_timer()
        if self.max_connections is not None:
            self._make_room()

    def on_response_complete(self) -> None:
        self._arm_header_timer()  # before a pipelined request starts a new cycle
        super().on_response_complete()  # type: ignore[misc]
        if self._over_capacity:
            self._transport().close()  # a connection beyond the cap serves one request

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _loop(self) -> asyncio.AbstractEventLoop:
        return self.loop  # type: ignore[attr-defined]

    def _transport(self) -> asyncio.Transport:
        return self.transport  # type: ignore[attr-defined]

    def _live(self) -> list[_HeaderTimeout]:
        """This server's open connections (those being closed are not counted)."""
        found: set[Any] = self.connections  # type: ignore[attr-defined]
        out = []
        for conn in found:
            transport = getattr(conn, "transport", None)
            if isinstance(conn, _HeaderTimeout) and transport is not None and not transport.is_closing():
                out.append(conn)
        return out

    def _make_room(self) -> None:
        """Close the oldest connection idle since it opened when this one passes the cap; else mark
        this one as beyond the cap (its request is refused, ``/healthz`` answered)."""
        assert self.max_connections is not None
        if len(self.connections) <= self.max_connections:  # type: ignore[attr-defined]
            return  # the quick case: closing connections included, there is room
        live = self._live()
        if len(live) <= self.max_connections:
            return
        idle = [c for c in live if c is not self and getattr(c, "cycle", None) is None]
        if idle:
            oldest = min(idle, key=lambda c: c._opened)
            log.info(
                "%d connections (the limit is %d): closing the oldest one that has sent no request yet",
                len(live),
                self.max_connections,
            )
            oldest._transport().close()
            return
        log.warning(
            "%d connections, all with requests (the limit is %d): refusing a new one", len(live), self.max_connections
        )
        self._over_capacity = True
        self.app = _beyond_cap(self.app, self)  # type: ignore[has-type]

    def _still_over_capacity(self) -> bool:
        if self._over_capacity and self.max_connections is not None and len(self._live()) <= self.max_connections:
            self._over_capacity = False  # room was made meanwhile: serve it as any other
        return self._over_capacity

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        waiting_after = getattr(self, "cycle", None)
        self._header_timer = self._loop().call_later(self.header_timeout, self._header_timed_out, waiting_after)

    def _header_timed_out(self, waiting_after: Any) -> None:
        self._header_timer = None
        transport = self._transport()
        if getattr(self, "cycle", None) is waiting_after and not transport.is_closing():
            log.info("closing a connection that sent no complete request head within %.3g s", self.header_timeout)
            transport.close()


def _beyond_cap(app: ASGIApp, protocol: _HeaderTimeout) -> ASGIApp:
    """``app`` for a connection beyond the cap: its requests are marked (the gate refuses them with
    503 ``overloaded``), except those to :data:`ALWAYS_ANSWERED` paths."""

    async def guarded(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("path") not in ALWAYS_ANSWERED and protocol._still_over_capacity():
            scope["extensions"] = {**(scope.get("extensions") or {}), OVER_CAPACITY: True}
        await app(scope, receive, send)

    return guarded


def guarded_protocol(header_timeout: float, max_connections: int | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with a request-head
    timeout and, when ``max_connections`` is given, the connection cap (see the module docstring)."""
    _check_seconds("--header-timeout", header_timeout)
    if max_connections is not None:
        _check_connections(max_connections)
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    attrs = {"header_timeout": float(header_timeout), "max_connections": max_connections}
    return type("GuardmergeHTTPProtocol", (_HeaderTimeout, AutoHTTPProtocol), attrs)


def header_timeout_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with a request-head timeout only (no connection cap)."""
    return guarded_protocol(header_timeout)


def uvicorn_limits(*, header_timeout: float, keep_alive_timeout: float, max_connections: int) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config`` that bound slow or numerous clients
    (uvicorn's own ``limit_concurrency`` is not used: the protocol enforces the cap)."""
    _check_seconds("--keep-alive-timeout", keep_alive_timeout)
    _check_connections(max_connections)
    return {
        "http": guarded_protocol(header_timeout, max_connections),
        "timeout_keep_alive": keep_alive_timeout,
    }
