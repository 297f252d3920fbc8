"""The NaN/Inf check of an ONNX graph's weights, and the digests that let a runtime skip it.

:func:`non_finite_initializers` parses the graph with the ``onnx`` package (whose import alone
takes about 0.7 s) and reads every float initializer and constant. ``guardmerge export-onnx``
runs it once, refuses a graph that fails it, and records the SHA-256 of each file it wrote for
the graph in ``guardmerge_onnx.json`` (``weights_sha256``). A runtime whose files still hash to
those digests holds exactly the weights that passed (:func:`digests_match`, about 0.07 s for a
90 MB MiniLM graph); a file changed since the export, or a folder without digests, gets the
full check. A graph whose external data lives in other files has them listed too, and a graph
that references a new file is itself a changed file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from guardmerge.errors import GuardmergeError

__all__ = ["digests_match", "file_digests", "non_finite_initializers"]


def file_digests(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """``{name: SHA-256 hex}`` of the files ``names`` in ``folder``."""
    out = {}
    for name in names:
        digest = hashlib.sha256()
        with open(folder / name, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        out[name] = digest.hexdigest()
    return out


def digests_match(folder: Path, digests: Mapping[str, str]) -> bool:
    """True when every file named in ``digests`` is in ``folder`` with that SHA-256."""
    try:
        return bool(digests) and file_digests(folder, digests) == dict(digests)
    except OSError:
        return False


def non_finite_initializers(path: Path) -> list[str]:
    """Names of the graph's floating-point initializers and constants (int8 graphs: their float
    scales) holding NaN or infinity. Needs the ``onnx`` package: without it this raises."""
    try:
        import onnx
    except ImportError:
        raise GuardmergeError(
            f"checking the weights of {path} for NaN or infinity needs the onnx package (the folder has no "
            "export digests, or its files changed since the export): pip install 'guardmerge[onnx]'"
        ) from None
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise GuardmergeError(f"{path} is not a readable ONNX graph: {text}") from None
    return [name for name, tensor in _graph_tensors(graph) if not _finite(tensor)]


def _graph_tensors(graph: Any) -> Iterator[tuple[str, Any]]:
    """``(name, TensorProto)`` of a graph's initializers and constant tensors, subgraphs included."""
    import onnx

    for init in graph.initializer:
        yield init.name, init
    for sparse in graph.sparse_initializer:
        yield sparse.values.name, sparse.values
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield node.output[0] if node.output else node.name, attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                for k, t in enumerate(attr.tensors):
                    yield f"{node.name or node.op_type}.{attr.name}[{k}]", t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graph_tensors(sub)


def _finite(tensor: Any) -> bool:
    """False when a floating-point ONNX tensor holds NaN or infinity (integer tensors: True)."""
    import onnx
    from onnx import numpy_helper

    kind = onnx.TensorProto
    floats = {kind.FLOAT, kind.DOUBLE, kind.FLOAT16, kind.BFLOAT16}
    floats |= {getattr(kind, n) for n in dir(kind) if n.startswith("FLOAT8")}
    if tensor.data_type not in floats:
        return True
    values = np.asarray(numpy_helper.to_array(tensor))
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float32)
    return bool(np.isfinite(values).all())
