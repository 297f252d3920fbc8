"""Export a merged multi-head model to one ONNX graph (``guardmerge export-onnx``).

The folder written is self-contained: ``model.onnx`` (inputs ``input_ids``, ``attention_mask``
and ``token_type_ids`` when the tokenizer produces them; one output ``logits_<task>`` of raw
logits per head, ``[batch, C]`` or, for a token head, ``[batch, sequence, C]``; dynamic ``batch``
and ``sequence`` axes), the tokenizer, and ``guardmerge_onnx.json`` naming the heads, their
labels, kind (``problem``), activation (``softmax``, ``sigmoid`` or ``token_softmax``), per-label
thresholds and outputs, the inputs, the precision and the merge provenance. With
``quantize="int8"`` the graph's weights are quantised with onnxruntime's dynamic quantisation
(int8 weights with per-channel scales, activations quantised per batch at run time).

Needs the ``onnx`` extra (``pip install 'guardmerge[onnx]'``).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guardmerge.errors import GuardmergeError
from guardmerge.export.metadata import META_FILE, ONNX_FILE
from guardmerge.export.weights import file_digests, non_finite_initializers
from guardmerge.io import atomic_dir
from guardmerge.models.multihead import MultiHeadModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
QUANTIZE_CHOICES = ("int8",)


def output_name(task: str) -> str:
    """The graph output carrying ``task``'s logits."""
    return f"logits_{task}"


class _Graph(nn.Module):
    """Positional inputs in ``inputs`` order -> one logits tensor per task (tuple, task order)."""

    def __init__(self, model: MultiHeadModel, inputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.inputs = inputs

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = dict(zip(self.inputs, args))
        out = self.model(**kwargs)
        return tuple(out[t] for t in self.model.tasks)


@contextmanager
def _eager_attention(model: MultiHeadModel) -> Iterator[None]:
    """Trace with the eager attention path (SDPA may drop an all-ones mask at trace time)."""
    enc = model.encoder
    cfg = getattr(enc, "config", None)
    before = getattr(cfg, "_attn_implementation", None)
    switch = getattr(enc, "set_attn_implementation", None)
    try:
        if callable(switch) and before not in (None, "eager"):
            switch("eager")
        yield
    finally:
        if callable(switch) and before not in (None, "eager"):
            switch(before)


def model_inputs(model: MultiHeadModel) -> tuple[str, ...]:
    """The graph inputs: what the tokenizer produces among input_ids/attention_mask/token_type_ids."""
    if model.tokenizer is None:
        raise GuardmergeError("this model has no tokenizer; ONNX export needs one (load it from a folder)")
    produced = set(model.encode(["a b"]))
    return tuple(n for n in INPUT_NAMES if n in produced)


def export_onnx(
    model: MultiHeadModel,
    out_dir: str | Path,
    quantize: str | None = None,
    *,
    force: bool = False,
    opset: int = OPSET,
) -> Path:
    """Write ``model`` as one ONNX graph plus tokenizer and metadata into ``out_dir`` (atomically).

    Args:
        model: a loaded merged model (with its tokenizer).
        out_dir: the output folder; refused if it exists unless ``force``.
        quantize: ``None`` for fp32, ``"int8"`` for dynamic int8 quantisation.
        opset: ONNX opset of the graph.
    """
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise GuardmergeError(f"unknown quantisation '{quantize}': use one of {', '.join(QUANTIZE_CHOICES)}")
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise GuardmergeError("ONNX export needs the onnx extra: pip install 'guardmerge[onnx]'") from None
    inputs = model_inputs(model)
    tasks = model.tasks
    # two texts of different lengths: the traced graph sees padding and a real mask
    example = model.encode(["a b", "a b c d e f g h"])
    args = tuple(example[n].to(torch.int64) for n in inputs)
    outputs = [output_name(t) for t in tasks]
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in inputs}
    axes.update(
        {output_name(t): {0: "batch", 1: "sequence"} if model.kind(t).per_token else {0: "batch"} for t in tasks}
    )
    with atomic_dir(out_dir, force=force) as tmp:
        target = tmp / ONNX_FILE
        raw = tmp / ".fp32.onnx" if quantize else target
        graph = _Graph(model, inputs).eval()
        with _eager_attention(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(
                graph,
                args,
                str(raw),
                dynamo=False,
                input_names=list(inputs),
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
            )
        used = _graph_inputs(raw)  # an input the encoder ignores (DeBERTa-v3's token types) is dropped
        if used != inputs:
            log.info("ONNX graph inputs: %s (the encoder does not read %s)", ", ".join(used), set(inputs) - set(used))
            inputs = used
        if quantize == "int8":
            _quantize_int8(raw, target)
            raw.unlink()
        bad = non_finite_initializers(target)
        if bad:
            raise GuardmergeError(
                f"the exported graph's weights hold NaN or infinity in {len(bad)} tensor(s) ({', '.join(bad[:5])}); "
                f"nothing was written to {out_dir}"
            )
        graph_files = sorted(p.name for p in tmp.iterdir() if p.is_file() and not p.name.startswith("."))
        model.tokenizer.save_pretrained(str(tmp))
        meta = onnx_metadata(model, inputs, quantize, opset)
        meta["weights_sha256"] = file_digests(tmp, graph_files)  # checked above: a runtime may skip the check
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("exported %d heads (%s) to %s", len(tasks), quantize or "fp32", out_dir)
    return Path(out_dir)


def _graph_inputs(path: Path) -> tuple[str, ...]:
    """The input names of the ONNX graph at ``path``, in order (weights not loaded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return tuple(i.name for i in graph.input)


def _quantize_int8(src: Path, dst: Path) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise GuardmergeError("int8 quantisation needs onnxruntime: pip install 'guardmerge[onnx]'") from None
    # per-channel weight scales: on the MiniLM guard model, per-tensor int8 moves logits by up to
    # 2.4 and macro-F1 by up to 8 points; per channel halves the logit error
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantiser logs one INFO line per tensor on root
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def onnx_metadata(model: MultiHeadModel, inputs: tuple[str, ...], quantize: str | None, opset: int) -> dict[str, Any]:
    """The ``guardmerge_onnx.json`` content: heads, labels, outputs, inputs, provenance."""
    from guardmerge import __version__

    max_len = min(512, int(model.config.get("max_position_embeddings", 512)))
    info = {k: v for k, v in model.info.items() if k in ("base_model", "method", "parameters", "experts")}
    return {
        "format": FORMAT_VERSION,
        "model_file": ONNX_FILE,
        "precision": quantize or "fp32",
        "opset": opset,
        "inputs": list(inputs),
        "max_length": max_len,
        "model_type": model.config.get("model_type"),
        "tasks": list(model.tasks),
        "heads": {t: _head_meta(model, t) for t in model.tasks},
        "info": info,
        "guardmerge_version": __version__,
    }


def _head_meta(model: MultiHeadModel, task: str) -> dict[str, Any]:
    """One head's entry: labels, output name, kind and activation (and per-label thresholds)."""
    problem = model.problem(task)
    meta: dict[str, Any] = {
        "labels": model.labels(task),
        "output": output_name(task),
        "problem": problem,
        "activation": model.kind(task).onnx_activation,
    }
    thresholds = model.spec(task).thresholds
    if thresholds:
        meta["thresholds"] = dict(thresholds)
    if model.spec(task).benign is not None:
        meta["benign"] = list(model.spec(task).benign or ())
    return meta
