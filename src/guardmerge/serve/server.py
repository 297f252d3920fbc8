"""Connection-level limits for ``guardmerge serve`` (uvicorn): header timeout, keep-alive, connection cap.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and concurrent connections
(``limit_concurrency``: beyond it new requests get a plain 503), but not the time a client may
take to send a request head. :func:`header_timeout_protocol` adds that: a connection that has
not sent a complete request head within ``header_timeout`` seconds of opening (or of the end
of its previous response) is closed. The body's own deadline is enforced by the app
(``ServeSettings.body_timeout``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from guardmerge.errors import GuardmergeError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine (``localhost``, 127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _HeaderTimeout:
    """Mixin for a uvicorn HTTP protocol: close connections that send no request head in time."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        self._arm_header_timer()  # before a pipelined request starts a new cycle
        super().on_response_complete()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        waiting_after = getattr(self, "cycle", None)
        loop: asyncio.AbstractEventLoop = self.loop  # type: ignore[attr-defined]
        self._header_timer = loop.call_later(self.header_timeout, self._header_timed_out, waiting_after)

    def _header_timed_out(self, waiting_after: Any) -> None:
        self._header_timer = None
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if getattr(self, "cycle", None) is waiting_after and not transport.is_closing():
            log.info("closing a connection that sent no complete request head within %.3g s", self.header_timeout)
            transport.close()


def header_timeout_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with a request-head timeout."""
    if not header_timeout > 0:
        raise GuardmergeError(f"--header-timeout must be > 0 seconds (got {header_timeout})")
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("GuardmergeHTTPProtocol", (_HeaderTimeout, AutoHTTPProtocol), {"header_timeout": float(header_timeout)})


def uvicorn_limits(*, header_timeout: float, keep_alive_timeout: float, max_connections: int) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config`` that bound slow or numerous clients."""
    if not keep_alive_timeout > 0:
        raise GuardmergeError(f"--keep-alive-timeout must be > 0 seconds (got {keep_alive_timeout})")
    if max_connections < 1:
        raise GuardmergeError(f"--max-connections must be at least 1 (got {max_connections})")
    return {
        "http": header_timeout_protocol(header_timeout),
        "timeout_keep_alive": keep_alive_timeout,
        "limit_concurrency": max_connections,
    }
