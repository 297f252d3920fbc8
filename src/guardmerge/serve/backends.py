"""Inference backends for the server: texts -> ``{task: logits [n, C_task]}`` as numpy arrays
(a token head's: ``[n, T, C_task]``, padded to the batch's longest text).

Both backends tokenise with the model's own tokenizer (padding to the longest text of the
batch, truncation at ``max_length``) and run the encoder once per call, whatever the number of
heads asked for. They are called from one worker thread at a time. Besides the logits, each
tells a head's kind (:meth:`problem`: ``single_label``, ``multi_label`` or ``token``), its stored
per-label thresholds, and each text's tokens with character offsets (:meth:`text_tokens`, what
turns a token head's rows into entity spans).

A backend checks its weights once, when it is built: ``bad_weights`` names the floating-point
weights (ONNX: initializers and constants) that hold NaN or infinity, and while any does,
:meth:`logits` raises :class:`~guardmerge.errors.NonFiniteWeightsError`, so such a model never
answers, whoever calls it (the server, the LLM Guard scanners). ``truncated(texts)`` tells which
texts the tokenizer cuts at ``max_length`` (their tail is never seen by the model).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from guardmerge.errors import GuardmergeError, NonFiniteWeightsError
from guardmerge.models.head_kinds import DEFAULT_KIND
from guardmerge.models.outputs import TextTokens, text_tokens

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
TEMP_EXPORT_NAME = "guardmerge-serve-onnx"
"""``serve --backend onnx`` on a merged folder exports into ``$TMPDIR/.guardmerge-serve-onnx.tmp-*``
(with its creator's pid), which a later call removes when that process is gone (SIGKILL)."""


def special_token_count(tokenizer: Any) -> int:
    """How many special tokens the tokenizer adds to one text ([CLS] and [SEP]: 2)."""
    return len(list(tokenizer([""])["input_ids"][0]))


def check_max_length(tokenizer: Any, max_length: int | None) -> None:
    """Refuse a ``max_length`` too small to hold the special tokens and one token of text."""
    if max_length is None:
        return
    least = special_token_count(tokenizer) + 1
    if max_length < least:
        raise GuardmergeError(
            f"--max-length {max_length} is too small: the tokenizer adds {least - 1} special token(s), "
            f"so the minimum is {least}"
        )


def token_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Each text's token count, special tokens included, before truncation and padding."""
    from guardmerge.serve.tokenizer import JsonTokenizer

    if isinstance(tokenizer, JsonTokenizer):
        enc = tokenizer(list(texts))
    else:  # transformers: no warning about texts longer than the model (that is what is measured)
        enc = tokenizer(list(texts), truncation=False, verbose=False)
    return [len(ids) for ids in enc["input_ids"]]


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

    # Optional: ``bad_weights: list[str]`` (weights holding NaN or infinity, found when the backend was
    # built; the server then answers 503 non_finite_weights), ``truncated(texts) -> list[bool]`` (texts
    # cut at max_length).

    # Optional: ``problem(task) -> str`` (default ``single_label``), ``thresholds(task) -> {label:
    # value}`` (the head's stored per-label thresholds), ``benign(task) -> [label] | None`` (its
    # stored benign labels), ``text_tokens(texts) -> list[TextTokens]`` and ``padding_side``
    # (needed for token heads).

    # Optional (older backends): ``non_finite_weights() -> list[str]``, read at start-up when the
    # backend has no ``bad_weights``.


class TorchBackend:
    """A :class:`~guardmerge.models.multihead.MultiHeadModel` in PyTorch (CPU)."""

    name = "torch"

    def __init__(self, model: Any, max_length: int | None = None) -> None:
        self.model = model
        self.max_length = max_length
        if model.tokenizer is None:
            raise GuardmergeError("the model has no tokenizer; serve a folder written by guardmerge merge")
        check_max_length(model.tokenizer, max_length)
        self.bad_weights: list[str] = self.non_finite_weights()
        if self.bad_weights:
            log.error("%s", NonFiniteWeightsError(self.bad_weights))

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

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text has more tokens than :meth:`logits` keeps (its tail is cut)."""
        limit = self.model.token_length(self.max_length)
        return [n > limit for n in token_counts(self.model.tokenizer, texts)]

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Each requested head's logits; :class:`NonFiniteWeightsError` when the weights hold NaN or Inf."""
        import torch

        if self.bad_weights:
            raise NonFiniteWeightsError(self.bad_weights)
        with torch.inference_mode():
            batch = self.model.encode(list(texts), self.max_length)
            out = self.model(tasks=tasks, **batch)
            return {t: v.float().numpy() for t, v in out.items()}

    def non_finite_weights(self) -> list[str]:
        """Names of the floating-point parameters and buffers holding NaN or infinity."""
        import torch

        from guardmerge.io.finite import all_finite

        bad = []
        with torch.inference_mode():
            for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
                if not all_finite(tensor):
                    bad.append(name)
        return bad

    def close(self) -> None:
        pass


class OnnxBackend:
    """A folder written by ``guardmerge export-onnx``, run with onnxruntime on the CPU.

    Opening it checks the metadata (:func:`~guardmerge.export.metadata.read_metadata`), that the
    graph is an ONNX graph with the inputs and outputs the metadata names, and every floating-point
    initializer and constant for NaN or infinity (this needs the ``onnx`` package: without it the
    backend refuses to open rather than serve unchecked weights).
    """

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

        self._cleanup = Path(_cleanup) if _cleanup else None
        self.folder = Path(folder)
        self.meta = read_metadata(self.folder)
        self.model_path = self.folder / self.meta["model_file"]
        self.tokenizer = load_runtime_tokenizer(self.folder)  # tokenizer.json: no torch, no transformers
        if self.tokenizer is None:
            raise GuardmergeError(f"{self.folder} has no usable tokenizer")
        check_max_length(self.tokenizer, max_length)
        self.max_length = max_length or int(self.meta.get("max_length", 512))
        self.inputs = list(self.meta["inputs"])
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        # the CPU arena would keep the largest batch's memory for good: shrink it back after each run
        # (benchmarks/soak.py measures the server's RSS growth)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        # the weight check (a file digest, or parsing the graph) overlaps building the session
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardmerge-onnx-check") as pool:
            check = pool.submit(self.non_finite_weights)
            try:
                self.session = ort.InferenceSession(
                    str(self.model_path), sess_options=opts, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:
                check.result()  # the weight check's own error comes first, naming what it found
                raise GuardmergeError(f"{self.model_path} is not a usable ONNX graph: {_one_line(exc)}") from None
            self.bad_weights: list[str] = check.result()
        if self.bad_weights:
            log.error("%s: %s", self.model_path, NonFiniteWeightsError(self.bad_weights))
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [h["output"] for h in self.meta["heads"].values() if h["output"] not in graph_outputs]
        if missing:
            raise GuardmergeError(f"{self.model_path} lacks the output(s) {', '.join(missing)} its metadata names")
        if graph_inputs != set(self.inputs):
            raise GuardmergeError(
                f"{self.model_path} takes the inputs {', '.join(sorted(graph_inputs))}, but its metadata names "
                f"{', '.join(self.inputs)}"
            )

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
        return str(self._head(task).get("problem", DEFAULT_KIND))

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

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text has more tokens than :meth:`logits` keeps (its tail is cut)."""
        return [n > self.max_length for n in token_counts(self.tokenizer, texts)]

    @property
    def info(self) -> dict[str, Any]:
        return {**self.meta.get("info", {}), "precision": self.meta.get("precision", "fp32")}

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Each requested head's logits; :class:`NonFiniteWeightsError` when the weights hold NaN or Inf."""
        if self.bad_weights:
            raise NonFiniteWeightsError(self.bad_weights)
        chosen = list(tasks) if tasks is not None else self.tasks
        for t in chosen:
            self.labels(t)
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        feeds = {n: np.asarray(enc[n], dtype=np.int64) for n in self.inputs}
        names = [self.meta["heads"][t]["output"] for t in chosen]
        outs = self.session.run(names, feeds, self.run_options)
        return {t: np.asarray(o, dtype=np.float32) for t, o in zip(chosen, outs)}

    def non_finite_weights(self) -> list[str]:
        """Names of the graph's float initializers and constants holding NaN or infinity: none
        when the files still hash to the digests the export recorded after checking them
        (:mod:`guardmerge.export.weights`); else the full check, which needs the ``onnx`` package."""
        from guardmerge.export.weights import digests_match, non_finite_initializers

        recorded = self.meta.get("weights_sha256")
        if recorded and digests_match(self.folder, recorded):
            return []
        return non_finite_initializers(self.model_path)

    def close(self) -> None:
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _temp_export_folder() -> Path:
    """A fresh ``$TMPDIR/.guardmerge-serve-onnx.tmp-*`` marked with this process's pid, after removing
    those of processes that are gone (a SIGKILLed server)."""
    from guardmerge.io import clean_stale_temps
    from guardmerge.io.atomic import _TMP_MARKER, _marker

    root = Path(tempfile.gettempdir())
    clean_stale_temps(root / TEMP_EXPORT_NAME)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TEMP_EXPORT_NAME}.tmp-", dir=root))
    try:
        (tmp / _TMP_MARKER).write_text(_marker())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def load_backend(
    path: str | Path, kind: str = "torch", *, max_length: int | None = None, threads: int | None = None
) -> Backend:
    """Open ``path`` with backend ``kind``.

    ``torch`` takes a merged model folder. ``onnx`` takes a folder written by
    ``guardmerge export-onnx``, or a merged model folder, which is then exported (fp32) to a
    temporary folder (:data:`TEMP_EXPORT_NAME`) removed by :meth:`Backend.close`, or, when the
    process was killed, by the next call.
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
        tmp = _temp_export_folder()
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
