"""Serve a merged guard model over HTTP (``guardmerge serve``; extra ``guardmerge[serve]``).

``create_app(model_or_backend, settings)`` builds the FastAPI app (:class:`ServeSettings`: its
limits and flagging, each field declared with its ``guardmerge serve`` flag); ``load_backend(path, kind)``
opens a model folder with the torch or onnx backend; :func:`flag_score` and
:func:`is_flagged` are the flag rule; :class:`MicroBatcher` groups concurrent
requests into shared encoder passes; :class:`RequestGate` checks auth and streams bodies within
limits before the app reads them; :func:`uvicorn_limits` bounds slow or numerous connections
(:func:`guarded_protocol`: a request-head timeout, and a connection cap that idle connections
cannot exhaust).
Names are imported lazily, so the backends and the batcher work without FastAPI installed.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "API_KEY_ENV": "settings",
    "ServeSettings": "settings",
    "create_app": "app",
    "parse_thresholds": "flags",
    "BACKENDS": "backends",
    "Backend": "backends",
    "OnnxBackend": "backends",
    "TorchBackend": "backends",
    "load_backend": "backends",
    "flag_score": "flags",
    "is_flagged": "flags",
    "MicroBatcher": "batching",
    "QueueFullError": "batching",
    "RequestGate": "gate",
    "guarded_protocol": "server",
    "header_timeout_protocol": "server",
    "is_loopback": "server",
    "uvicorn_limits": "server",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'guardmerge.serve' has no attribute '{name}'")
    return getattr(importlib.import_module(f"guardmerge.serve.{_WHERE[name]}"), name)
