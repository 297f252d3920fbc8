"""The ASGI gate in front of the API: auth before the body, a streamed size and time limit, metrics.

For every HTTP request, in this order, before the application reads anything:

0. a request on a connection beyond the server's connection cap (the protocol marks its scope,
   see :mod:`guardmerge.serve.server`) is refused with 503 ``overloaded`` and the connection is
   closed (``/healthz`` is never marked: it is always answered);
1. protected paths (``/v1/*``, ``/metrics``) need ``Authorization: Bearer <key>`` when the
   server has a key (401 ``unauthorized``, and the connection is closed, so an unauthenticated
   client cannot keep it open); the body is not read;
2. a declared ``Content-Length`` above the body limit is refused (413 ``body_too_large``);
3. routes that take a JSON body need ``Content-Type: application/json`` (or ``*+json``;
   415 ``unsupported_media_type``);
4. their body is read here, counting bytes as they arrive: 413 ``body_too_large`` as soon as the
   limit is passed (chunked bodies included), 408 ``request_timeout`` when the whole body has not
   arrived within the body timeout, 400 ``malformed_json`` when it is not UTF-8. The application
   then gets the body from memory.

Early refusals of a request whose body is still on the wire close the connection.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Collection

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardmerge.serve.server import OVER_CAPACITY

log = logging.getLogger(__name__)

ErrorFactory = Callable[..., Response]
"""``(request, status, code, message, details=None, headers=None) -> Response``."""

MISSING_TOKEN = "missing bearer token: send 'Authorization: Bearer <key>'"
WRONG_TOKEN = "wrong bearer token"


def bearer_problem(authorization: str | None, key: str) -> str | None:
    """Why ``authorization`` (a header value) does not carry ``Bearer <key>``, or None when it does."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return MISSING_TOKEN
    # header values are latin-1 decoded: compare the bytes the client sent with the key's UTF-8 bytes
    try:
        sent = credentials.encode("latin-1")
    except UnicodeEncodeError:
        sent = credentials.encode("utf-8", "surrogateescape")
    return None if hmac.compare_digest(sent, key.encode("utf-8")) else WRONG_TOKEN


def is_json_media_type(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters ignored."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class _Refused(Exception):
    """The request is answered by the gate (``response``), or dropped when ``response`` is None."""

    def __init__(self, response: Response | None) -> None:
        super().__init__("refused")
        self.response = response


class RequestGate:
    """ASGI middleware enforcing auth, media type and body limits before the app runs (see the module docstring).

    Args:
        app: the wrapped ASGI application.
        error: builds an error response (and counts it).
        on_done: ``(scope, status, seconds)`` after every HTTP request, for metrics.
        api_key: the key, or None for no auth.
        protected: paths needing the key: exact paths, or prefixes ending in ``/``.
        json_routes: ``(method, path)`` pairs whose JSON body the gate reads and checks.
        read_routes: path prefixes whose POST bodies the gate reads within the size and time
            limits without checking their type (the KServe v2 routes: JSON or binary tensors).
        max_body: most body bytes of any request.
        body_timeout: seconds within which the whole body of a JSON route must arrive.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        error: ErrorFactory,
        on_done: Callable[[Scope, int, float], None],
        api_key: str | None,
        protected: Collection[str],
        json_routes: Collection[tuple[str, str]],
        max_body: int,
        body_timeout: float,
        read_routes: Collection[str] = (),
    ) -> None:
        self.app = app
        self.error = error
        self.on_done = on_done
        self.api_key = api_key
        self.protected = tuple(protected)
        self.json_routes = frozenset(json_routes)
        self.read_routes = tuple(read_routes)
        self.max_body = max_body
        self.body_timeout = body_timeout

    def _is_protected(self, path: str) -> bool:
        return any(path == p or (p.endswith("/") and path.startswith(p)) for p in self.protected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            try:
                inner_receive = await self._admit(scope, receive)
            except _Refused as refused:
                if refused.response is None:  # the client went away while sending
                    status = 499
                    return
                await refused.response(scope, receive, send_status)
                return
            await self.app(scope, inner_receive, send_status)
        finally:
            self.on_done(scope, status, time.perf_counter() - started)

    def _refuse(
        self, scope: Scope, status: int, code: str, message: str, *, close: bool, headers: dict[str, str] | None = None
    ) -> _Refused:
        extra = dict(headers or {})
        if close:
            extra["Connection"] = "close"
        return _Refused(self.error(Request(scope), status, code, message, None, extra or None))

    async def _admit(self, scope: Scope, receive: Receive) -> Receive:
        """The receive callable for the app, or raise :class:`_Refused`."""
        headers = Headers(scope=scope)
        path, method = scope["path"], scope["method"]
        length = headers.get("content-length", "").strip()
        body_pending = "transfer-encoding" in headers or (length not in ("", "0"))

        if (scope.get("extensions") or {}).get(OVER_CAPACITY):
            raise self._refuse(
                scope,
                503,
                "overloaded",
                "the server has as many connections as it accepts (--max-connections); retry later",
                close=True,
                headers={"Retry-After": "1"},
            )
        if self.api_key is not None and self._is_protected(path):
            problem = bearer_problem(headers.get("authorization"), self.api_key)
            if problem is not None:
                raise self._refuse(
                    scope, 401, "unauthorized", problem, close=True, headers={"WWW-Authenticate": "Bearer"}
                )
        if length.isdigit() and int(length) > self.max_body:
            raise self._refuse(
                scope, 413, "body_too_large", f"the body has {length} bytes; the limit is {self.max_body}", close=True
            )
        if (method, path) not in self.json_routes:
            if method == "POST" and path.startswith(self.read_routes):
                return _replay(await self._read_body(scope, receive), receive)
            return receive
        content_type = headers.get("content-type", "")
        if not is_json_media_type(content_type):
            got = f"got '{content_type.split(';', 1)[0].strip()}'" if content_type.strip() else "got none"
            raise self._refuse(
                scope,
                415,
                "unsupported_media_type",
                f"the body must be JSON sent with 'Content-Type: application/json' ({got})",
                close=body_pending,
            )
        body = await self._read_body(scope, receive)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._refuse(
                scope,
                400,
                "malformed_json",
                f"the request body is not valid JSON: it is not UTF-8 (byte {exc.start})",
                close=False,
            ) from None
        return _replay(body, receive)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, counting bytes as they arrive, within the size and time limits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks: list[bytes] = []
        total = 0
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                log.info(
                    "refused a request body not received within %.3g s (%d bytes arrived)", self.body_timeout, total
                )
                raise self._refuse(
                    scope,
                    408,
                    "request_timeout",
                    f"the request body did not arrive within {self.body_timeout:g} s ({total} bytes received)",
                    close=True,
                ) from None
            if message["type"] == "http.disconnect":
                raise _Refused(None)
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                raise self._refuse(
                    scope,
                    413,
                    "body_too_large",
                    f"the body has more than {self.max_body} bytes (the limit)",
                    close=True,
                )
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive callable that yields ``body`` once, then defers to ``receive`` (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
