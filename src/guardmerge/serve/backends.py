"""Inference backends for the server: texts -> ``{task: logits [n, C_task]}`` as numpy arrays
(a token head's: ``[n, T, C_task]``, padded to the batch's longest text).

Both backends tokenise with the model's own tokenizer (padding to the longest text of the
batch, truncation at ``max_length``) and run the encoder once per call, whatever the number of
heads asked for. They are called from one worker thread at a time. Besides the logits, each
tells a head's kind (:meth:`problem`: ``single_label``, ``multi_label`` or ``token``), its stored
per-label thresholds, and each text's tokens with character offsets (:meth:`text_tokens`, what
turns a token head's rows into entity spans).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from guardmerge.errors import GuardmergeError
from guardmerge.outputs import TextTokens, text_tokens

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")


@runtime_checkable
class Backend(Protocol):
    """What the server needs from a model."""

    name: str

    @property
    def tasks(self) -> list[str]: ...

    def labels(self, task: str) -> list[str]: ...

    @property
    def info(self) -> dict[str, Any]: ...

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...

    # Optional: ``problem(task) -> str`` (default ``single_label``), ``thresholds(task) -> {label:
    # value}`` (the head's stored per-label thresholds), ``benign(task) -> [label] | None`` (its
    # stored benign labels), ``text_tokens(texts) -> list[TextTokens]`` and ``padding_side``
    # (needed for token heads).

    # Optional: ``non_finite_weights() -> list[str]``, the names of weights holding NaN or infinity;
    # the server calls it once at start-up and reports not ready (/healthz 503) when any is found.


class TorchBackend:
    """A :class:`~guardmerge.models.multihead.MultiHeadModel` in PyTorch (CPU)."""

    name = "torch"

    def __init__(self, model: Any, max_length: int | None = None) -> None:
        self.model = model
        self.max_length = max_length
        if model.tokenizer is None:
            raise GuardmergeError("the model has no tokenizer; serve a folder written by guardmerge merge")

    @property
    def tasks(self) -> list[str]:
        return list(self.model.tasks)

    def labels(self, task: str) -> list[str]:
        return self.model.labels(task)

    def problem(self, task: str) -> str:
        return str(self.model.problem(task))

    def thresholds(self, task: str) -> dict[str, float]:
        return dict(self.model.spec(task).thresholds)

    def benign(self, task: str) -> list[str] | None:
        """The head's stored benign labels (None: not given)."""
        stored = self.model.spec(task).benign
        return None if stored is None else list(stored)

    @property
    def padding_side(self) -> str:
        return str(self.model.padding_side)

    def text_tokens(self, texts: Sequence[str]) -> list[TextTokens]:
        """Each text's tokens as :meth:`logits` reads them, with character offsets."""
        return list(self.model.text_tokens(texts, self.max_length))

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.model.info)

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            batch = self.model.encode(list(texts), self.max_length)
            out = self.model(tasks=tasks, **batch)
            return {t: v.float().numpy() for t, v in out.items()}

    def non_finite_weights(self) -> list[str]:
        """Names of the floating-point parameters and buffers holding NaN or infinity."""
        import torch

        bad = []
        with torch.inference_mode():
            for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad.append(name)
        return bad

    def close(self) -> None:
        pass


class OnnxBackend:
    """A folder written by ``guardmerge export-onnx``, run with onnxruntime on the CPU."""

    name = "onnx"

    def __init__(
        self,
        folder: str | Path,
        max_length: int | None = None,
        threads: int | None = None,
        _cleanup: str | Path | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise GuardmergeError("the onnx backend needs onnxruntime: pip install 'guardmerge[onnx]'") from None
        from guardmerge.export.metadata import read_metadata
        from guardmerge.serve.tokenizer import load_runtime_tokenizer

        self.folder = Path(folder)
        self.meta = read_metadata(self.folder)
        self.tokenizer = load_runtime_tokenizer(self.folder)  # tokenizer.json: no torch, no transformers
        if self.tokenizer is None:
            raise GuardmergeError(f"{self.folder} has no usable tokenizer")
        self.max_length = max_length or int(self.meta.get("max_length", 512))
        self.inputs = list(self.meta["inputs"])
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.folder / self.meta["model_file"]), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._cleanup = Path(_cleanup) if _cleanup else None

    @property
    def tasks(self) -> list[str]:
        return list(self.meta["tasks"])

    def labels(self, task: str) -> list[str]:
        return list(self._head(task)["labels"])

    def _head(self, task: str) -> dict[str, Any]:
        if task not in self.meta["heads"]:
            raise GuardmergeError(f"unknown task '{task}'; this model has: {', '.join(self.tasks)}")
        return dict(self.meta["heads"][task])

    def problem(self, task: str) -> str:
        return str(self._head(task).get("problem", "single_label"))

    def thresholds(self, task: str) -> dict[str, float]:
        return {str(k): float(v) for k, v in (self._head(task).get("thresholds") or {}).items()}

    def benign(self, task: str) -> list[str] | None:
        """The head's stored benign labels (None: not given)."""
        stored = self._head(task).get("benign")
        return None if stored is None else [str(x) for x in stored]

    @property
    def padding_side(self) -> str:
        return str(getattr(self.tokenizer, "padding_side", "right") or "right")

    def text_tokens(self, texts: Sequence[str]) -> list[TextTokens]:
        """Each text's tokens as :meth:`logits` reads them, with character offsets."""
        return text_tokens(self.tokenizer, texts, self.max_length)

    @property
    def info(self) -> dict[str, Any]:
        return {**self.meta.get("info", {}), "precision": self.meta.get("precision", "fp32")}

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        chosen = list(tasks) if tasks is not None else self.tasks
        for t in chosen:
            self.labels(t)
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        feeds = {n: np.asarray(enc[n], dtype=np.int64) for n in self.inputs}
        names = [self.meta["heads"][t]["output"] for t in chosen]
        outs = self.session.run(names, feeds)
        return {t: np.asarray(o, dtype=np.float32) for t, o in zip(chosen, outs)}

    def non_finite_weights(self) -> list[str]:
        """Names of the graph's floating-point initializers holding NaN or infinity (needs ``onnx``;
        without it nothing is checked)."""
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            log.warning("the onnx package is missing: the weights of %s are not checked for NaN", self.folder)
            return []
        graph = onnx.load(str(self.folder / self.meta["model_file"])).graph
        bad = []
        for init in graph.initializer:
            values = numpy_helper.to_array(init)
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                bad.append(init.name)
        return bad

    def close(self) -> None:
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None


def load_backend(
    path: str | Path, kind: str = "torch", *, max_length: int | None = None, threads: int | None = None
) -> Backend:
    """Open ``path`` with backend ``kind``.

    ``torch`` takes a merged model folder. ``onnx`` takes a folder written by
    ``guardmerge export-onnx``, or a merged model folder, which is then exported (fp32) to a
    temporary folder removed by :meth:`Backend.close`.
    """
    if kind not in BACKENDS:
        raise GuardmergeError(f"unknown backend '{kind}': use one of {', '.join(BACKENDS)}")
    folder = Path(path)
    if not folder.is_dir():
        raise GuardmergeError(f"model folder '{folder}' does not exist")
    from guardmerge.export.metadata import is_onnx_folder

    if kind == "onnx":
        if is_onnx_folder(folder):
            return OnnxBackend(folder, max_length=max_length, threads=threads)
        import guardmerge
        from guardmerge.export.onnx import export_onnx

        model = guardmerge.load(str(folder))
        tmp = Path(tempfile.mkdtemp(prefix="guardmerge-onnx-"))
        try:
            log.info("exporting %s to ONNX in %s", folder, tmp)
            export_onnx(model, tmp / "onnx")
            return OnnxBackend(tmp / "onnx", max_length=max_length, threads=threads, _cleanup=tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if is_onnx_folder(folder):
        raise GuardmergeError(f"'{folder}' is an ONNX export: serve it with --backend onnx")
    import guardmerge

    if threads:
        import torch

        torch.set_num_threads(threads)
    return TorchBackend(guardmerge.load(str(folder)), max_length=max_length)
