"""Commands that publish a merged model: push (to the Hugging Face Hub)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from guardmerge.cli import app

log = logging.getLogger("guardmerge")


@app.command()
def push(
    merged: Annotated[Path, typer.Argument(help="A merged model folder (written by guardmerge merge).")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repository OWNER/NAME; created if missing.")],
    fidelity: Annotated[
        Path | None,
        typer.Option(
            help="Fidelity report to publish as fidelity.json (guardmerge eval MERGED --experts --out FILE); "
            "default: MERGED/fidelity.json if there is one."
        ),
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="Create the repository private (refused if it exists and is public).")
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="HF_TOKEN",
            show_default=False,
            help="Hub token with write access (default: $HF_TOKEN, else the login saved by `hf auth login`).",
        ),
    ] = None,
    branch: Annotated[
        str | None, typer.Option(help="Branch to commit to, created from main if missing (default: main).")
    ] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(help="Hub URL, for a self-hosted Hub (default: $HF_ENDPOINT, else https://huggingface.co)."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar while files are hashed.")] = True,
) -> None:
    """Push MERGED to the Hugging Face Hub as REPO_ID, in one commit: weights, config.json,
    tokenizer, merge_config.yaml, the model card (README.md, adapted for the Hub) and the fidelity
    report. Load it anywhere with guardmerge.load("OWNER/NAME").

    MERGED is checked first: it must load as a merged model and hold its model card and
    merge_config.yaml. Hidden and temporary files and sub-folders are not pushed; files of an
    earlier push that loading would read (weights, JSON, tokenizer files) and MERGED lacks are
    deleted in the same commit."""
    from guardmerge.io.hub import push_to_hub

    url = push_to_hub(
        merged,
        repo_id,
        fidelity=fidelity,
        private=True if private else None,
        token=token or None,
        branch=branch,
        commit_message=message,
        endpoint=endpoint,
        progress=progress,
    )
    typer.echo(f"pushed {merged} -> {repo_id}{f' (branch {branch})' if branch else ''}: {url}")
