"""The ``guardmerge`` command line: the app and its entry point here, the commands in
:mod:`~guardmerge.cli.merging`, :mod:`~guardmerge.cli.experts`, :mod:`~guardmerge.cli.serving`
and :mod:`~guardmerge.cli.hub`.
Heavy modules are imported inside commands, so --help is instant."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Annotated

import typer

from guardmerge.errors import GuardmergeError

app = typer.Typer(
    name="guardmerge",
    help=(
        "Merge fine-tuned transformer classifiers (BERT, RoBERTa, XLM-R, DistilBERT, DeBERTa-v3, ModernBERT, "
        "ELECTRA, MPNet, ALBERT), training-free, "
        "into one multi-head model: one encoder pass answers every guard task.\n\n"
        "Start with `guardmerge demo`, list methods with `guardmerge methods`, merge with "
        "`guardmerge merge CONFIG OUT`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("guardmerge")


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # read by transformers when (and only if) a command imports it: start-up stays fast
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# the commands register themselves on ``app``, in this order in --help
for _module in ("merging", "experts", "serving", "hub"):
    importlib.import_module(f"guardmerge.cli.{_module}")

# Commands whose work is complete (files closed and renamed into place) when they return: after
# success the process exits at once, skipping the interpreter's teardown (about 0.4 s spent
# freeing torch's modules, a tenth of a small merge).
_FAST_EXIT_COMMANDS = frozenset({"merge", "self-merge"})


def _exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _close_progress_bars() -> None:
    """End the progress bars an error interrupted, so the error gets a line of its own."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def _one_line(text: str, limit: int = 2000) -> str:
    """An error message on one line, of bounded length."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def main() -> None:
    """Console entry point: clean one-line errors for bad input, exit code 2."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    try:
        app()
    except SystemExit as exc:
        if command in _FAST_EXIT_COMMANDS and exc.code in (None, 0):
            _exit_now()
        raise
    except GuardmergeError as exc:
        _close_progress_bars()
        typer.echo(f"error: {_one_line(str(exc))}", err=True)
        raise SystemExit(2) from None
    except OSError as exc:  # a path the system refuses (too long, permissions, disk full) is a user error
        _close_progress_bars()
        where = f"{_one_line(str(exc.filename))[:200]}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
