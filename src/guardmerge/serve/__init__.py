"""Serve a merged guard model over HTTP (``guardmerge serve``; extra ``guardmerge[serve]``).

``create_app(model_or_backend, settings)`` builds the FastAPI app; ``load_backend(path, kind)``
opens a model folder with the torch or onnx backend; :class:`MicroBatcher` groups concurrent
requests into shared encoder passes.
"""

from __future__ import annotations

from guardmerge.serve.app import API_KEY_ENV, ServeSettings, create_app, parse_thresholds
from guardmerge.serve.backends import BACKENDS, Backend, OnnxBackend, TorchBackend, load_backend
from guardmerge.serve.batching import MicroBatcher, QueueFullError

__all__ = [
    "API_KEY_ENV",
    "BACKENDS",
    "Backend",
    "MicroBatcher",
    "OnnxBackend",
    "QueueFullError",
    "ServeSettings",
    "TorchBackend",
    "create_app",
    "load_backend",
    "parse_thresholds",
]
