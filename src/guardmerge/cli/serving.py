"""Commands that serve a merged model: serve, export-onnx."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from guardmerge.cli import app
from guardmerge.serve.options import serve_options

log = logging.getLogger("guardmerge")


@app.command()
@serve_options
def serve(
    model: Annotated[
        Path, typer.Argument(help="A merged model folder, or (with --backend onnx) a folder from export-onnx.")
    ],
    **flags: Any,
) -> None:
    """Serve MODEL over HTTP: POST /v1/classify, GET /v1/model, /healthz, /metrics (Prometheus);
    the OpenAPI document is at /openapi.json. Needs the extra named serve.

    Single-label heads answer a label, its score and every label's probability; multi-label heads
    every label's sigmoid probability and the labels at or above their thresholds; token heads
    their entity spans (type, character offsets, text, score). A text is flagged when any head
    flags it: a non-benign label at or above its threshold, or (token heads) an entity of a
    flagged type."""
    from guardmerge.serve.process import run_serve

    run_serve(model, flags)


@app.command("export-onnx")
def export_onnx_(
    model: Annotated[Path, typer.Argument(help="A merged model folder.")],
    out: Annotated[Path, typer.Argument(help="Output folder: model.onnx, tokenizer, guardmerge_onnx.json.")],
    quantize: Annotated[str | None, typer.Option(help="int8: dynamic int8 quantisation of the weights.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Export MODEL as one ONNX graph (all heads' logits as outputs logits_<task>, dynamic batch and
    sequence axes), self-contained with its tokenizer; serve it with `guardmerge serve OUT --backend onnx`."""
    from guardmerge.export.onnx import export_onnx
    from guardmerge.io import check_output

    check_output(out, force=force, inputs=[model])
    import guardmerge

    export_onnx(guardmerge.load(str(model)), out, quantize=quantize, force=force)
    typer.echo(f"exported {model} to ONNX ({quantize or 'fp32'}) -> {out}")
