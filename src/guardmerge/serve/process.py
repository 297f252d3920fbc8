"""``guardmerge serve`` as a process: from its parsed flags to uvicorn (:func:`run_serve`), and its signals.

From the moment the backend is opened, SIGTERM and SIGINT unwind through the clean-up (a temporary
ONNX export is removed), whenever they come: during the export, before uvicorn takes them, or after
uvicorn re-raises the one it caught. The process then ends as the signal asks (:func:`end_by_signal`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardmerge.errors import GuardmergeError
from guardmerge.serve.options import check_flags, from_flags
from guardmerge.serve.settings import API_KEY_ENV, ServeSettings, check_api_key

if TYPE_CHECKING:
    from guardmerge.serve.backends import Backend

log = logging.getLogger(__name__)

__all__ = [
    "STOP_SIGNALS",
    "Stopped",
    "end_by_signal",
    "hold_signals",
    "restore_signals",
    "run_serve",
    "serve_until_stopped",
    "stop_on_signals",
]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """SIGTERM or SIGINT reached ``serve``: unwind (removing a temporary export), then end as the signal asks."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def stop_on_signals() -> dict[int, Any]:
    """Make SIGTERM and SIGINT raise :class:`Stopped` (uvicorn puts this back after serving and then
    re-raises the signal it caught); the previous handlers, to restore."""

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    if not _main_thread():  # only the main thread may set handlers
        return {}
    return {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}


def hold_signals(pending: list[int]) -> None:
    """While cleaning up: record SIGTERM and SIGINT in ``pending`` instead of letting them interrupt the clean-up."""
    if _main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, _frame: pending.append(signum))


def restore_signals(previous: Mapping[int, Any]) -> None:
    """Put back the handlers :func:`stop_on_signals` replaced."""
    for sig, handler in previous.items():
        if handler is not None:
            signal.signal(sig, handler)


def end_by_signal(signum: int) -> None:
    """End the process as ``signum`` would have: SIGINT as Ctrl-C (exit 130), others by the signal itself."""
    log.info("stopped by %s", signal.Signals(signum).name)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    for handler in logging.getLogger().handlers:
        handler.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def serve_until_stopped(open_backend: Callable[[], Backend], serve: Callable[[Backend], None]) -> None:
    """``serve(open_backend())``, then close the backend, whatever stops it; a stop signal that came
    meanwhile then ends the process (:func:`end_by_signal`)."""
    previous = stop_on_signals()
    backend = None
    stopped_by: int | None = None
    pending: list[int] = []
    try:
        backend = open_backend()
        serve(backend)
    except Stopped as stop:
        stopped_by = stop.signum
    finally:
        hold_signals(pending)
        try:
            if backend is not None:
                backend.close()
        finally:
            restore_signals(previous)
    if stopped_by is None and pending:
        stopped_by = pending[0]
    if stopped_by is not None:
        end_by_signal(stopped_by)


def run_serve(model: Path, flags: Mapping[str, Any]) -> None:
    """Serve ``model`` as ``guardmerge serve`` does with its parsed ``flags`` (every option, by field name)."""
    options = check_flags(flags)
    api_key = flags["api_key"]
    if api_key is None and os.environ.get(API_KEY_ENV) is not None:
        api_key = os.environ[API_KEY_ENV]  # click reads an empty variable as unset: refuse it below
    try:
        import uvicorn

        from guardmerge.serve.app import create_app
        from guardmerge.serve.backends import load_backend
        from guardmerge.serve.server import is_loopback, uvicorn_limits
    except ImportError as exc:
        raise GuardmergeError(
            f"serving needs the serve extra ({exc.name} is missing): pip install 'guardmerge[serve]'"
        ) from None

    check_api_key(api_key, "--api-key (or $GUARDMERGE_API_KEY)")
    limits = uvicorn_limits(
        header_timeout=options.header_timeout,
        keep_alive_timeout=options.keep_alive_timeout,
        max_connections=options.max_connections,
    )
    settings = from_flags(ServeSettings, {**flags, "api_key": api_key})
    if api_key is None and not is_loopback(options.host):
        log.warning(
            "serving on %s without an API key: anyone who can reach it can classify and read /metrics "
            "(set --api-key or $GUARDMERGE_API_KEY)",
            options.host or "every address",
        )

    if options.ray is not None:
        serve_on_ray(model, options, settings)
        return

    def serve(backend: Backend) -> None:
        application = create_app(backend, settings)
        log.info("listening on http://%s:%d (docs at /docs)", options.host, options.port)
        uvicorn.run(
            application,
            host=options.host,
            port=options.port,
            access_log=options.access_log,
            log_level=logging.getLevelName(log.getEffectiveLevel()).lower(),
            **limits,
        )

    serve_until_stopped(
        lambda: load_backend(model, options.backend, max_length=options.max_length, threads=options.threads), serve
    )


def wait_until_closed(host: str, port: int, *, timeout: float) -> bool:
    """Poll ``host:port`` until it refuses connections (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port), timeout=1):
                pass
        except OSError:
            return True
        if time.monotonic() >= deadline:
            log.warning("port %d still accepts connections %.0f s after Ray's shutdown", port, timeout)
            return False
        time.sleep(0.25)


def serve_on_ray(model: Path, options: Any, settings: ServeSettings) -> None:
    """``guardmerge serve --ray``: the app on Ray Serve replicas (:mod:`guardmerge.integrations.ray_serve`)
    behind Ray Serve's proxy on ``--host:--port``, until SIGTERM or SIGINT; then the application is
    deleted (a local cluster is stopped with this process)."""
    from guardmerge.integrations.ray_serve import deployment, run

    autoscaling = None
    if options.max_replicas is not None:
        autoscaling = {"min_replicas": options.replicas, "max_replicas": options.max_replicas}
    app = deployment(
        model,
        backend=options.backend,
        settings=settings,
        replicas=options.replicas,
        autoscaling=autoscaling,
        threads=options.threads,
        max_length=options.max_length,
    )
    previous: dict[int, Any] = {}
    stopped_by: int | None = None
    try:
        run(app, address=None if options.ray == "local" else options.ray, host=options.host, port=options.port)
        previous = stop_on_signals()  # after Ray's start: its core installs signal handlers of its own
        log.info(
            "serving %s on Ray Serve (%s replica(s)) at http://%s:%d",
            model,
            options.replicas if options.max_replicas is None else f"{options.replicas}-{options.max_replicas}",
            options.host,
            options.port,
        )
        while True:  # Ray's proxy and replicas serve; this process waits for a stop signal
            if _main_thread():
                signal.pause()
            else:
                threading.Event().wait(3600)
    except Stopped as stop:
        stopped_by = stop.signum
    finally:
        restore_signals(previous)
        with contextlib.suppress(Exception):  # nothing to delete when the start failed
            import ray
            from ray import serve

            serve.delete("guardmerge")
            if options.ray == "local":  # the cluster this process started ends with it
                serve.shutdown()
                ray.shutdown()
                # Ray's proxy is a worker process that notices its raylet is gone a moment later:
                # return only once nothing answers on the port any more
                wait_until_closed(options.host, options.port, timeout=60.0)
    if stopped_by is not None:
        # exit now, as a shell reports a signal (128 + N): the interpreter's teardown of Ray's core
        # objects can abort (SIGABRT) after a signal, though everything is already stopped
        log.info("stopped by %s", signal.Signals(stopped_by).name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(128 + stopped_by)
