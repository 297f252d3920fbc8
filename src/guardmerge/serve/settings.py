"""The settings of one server (:class:`ServeSettings`), each field declared with its ``guardmerge serve`` flag.

A field's :class:`Flag` (``dataclasses.field`` metadata, made by :func:`cli_flag`) holds its help text and,
where the command line differs from the field, its flag name, its command-line type and the parser from
one to the other; :mod:`guardmerge.serve.options` builds the command's options from them. This module
imports neither FastAPI nor numpy: the command line reads it before it serves anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from guardmerge.errors import GuardmergeError

__all__ = [
    "API_KEY_ENV",
    "CLI",
    "MAX_TIMEOUT_S",
    "MAX_WAIT_MS",
    "SETTING_RANGES",
    "Flag",
    "ServeSettings",
    "check_api_key",
    "check_seconds",
    "cli_flag",
    "public_model_name",
]

API_KEY_ENV = "GUARDMERGE_API_KEY"

SETTING_RANGES: dict[str, tuple[int, int]] = {
    "max_texts": (1, 10_000),
    "max_chars": (1, 1_000_000),
    "max_batch": (1, 1024),
    "max_queue": (1, 1_000_000),
}
"""The integer limits a server accepts (inclusive)."""
MAX_WAIT_MS = 10_000.0
MAX_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Flag:
    """How a dataclass field is given on the command line of ``guardmerge serve``.

    Attributes:
        help: the option's help text.
        name: the flag, when it is not the field's name with dashes (``--threshold`` of ``thresholds``).
        cli_type: its type on the command line, when it is not the field's (``list[str] | None``: repeatable).
        parse: command-line value -> field value (needed with ``cli_type``).
        envvar: an environment variable that gives the value when the flag is absent.
    """

    help: str
    name: str | None = None
    cli_type: Any = None
    parse: Callable[[Any], Any] | None = None
    envvar: str | None = None


CLI = "cli"
"""The key of a field's :class:`Flag` in its ``metadata``."""


def cli_flag(help: str, **how: Any) -> dict[str, Flag]:
    """``metadata`` of a dataclass field given on the command line: its :class:`Flag` (``help``, ``how``)."""
    return {CLI: Flag(help, **how)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _thresholds(items: list[str] | None) -> dict[str, float | None]:
    from guardmerge.serve.flags import parse_thresholds  # numpy: only when the command runs

    return parse_thresholds(items or [])


def _label_lists(option: str) -> Callable[[list[str] | None], dict[str, list[str]]]:
    def parse(items: list[str] | None) -> dict[str, list[str]]:
        from guardmerge.serve.flags import parse_label_lists

        return parse_label_lists(items or [], option)

    return parse


_REPEATED = list[str] | None
"""The command-line type of a flag given once per task (``--threshold hate=0.8 --threshold x=off``)."""


def check_seconds(name: str, value: float, flag: str | None = None) -> None:
    """Refuse a timeout that is not a finite number of seconds in (0, :data:`MAX_TIMEOUT_S`]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT_S:
        raise GuardmergeError(
            f"{name} ({flag or _flag(name)}) must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g} (got {value!r})"
        )


@dataclass
class ServeSettings:
    """Limits, batching and flagging of one server.

    Attributes:
        max_texts: most texts in one request (more: 413 ``too_many_texts``).
        max_chars: most characters in one text (more: 413 ``text_too_long``).
        max_batch: most texts per encoder pass (micro-batch).
        max_wait_ms: longest wait of the oldest queued text for a fuller batch.
        max_queue: most texts waiting for a batch (more: 503 ``overloaded``).
        thresholds: ``task`` or ``task.label`` -> flag threshold, or None to never flag that
            task (label); a label's own entry wins over its task's.
        default_threshold: the threshold of tasks not in ``thresholds``.
        benign: sequence task -> its benign labels (default: the head's stored ones, else
            :func:`~guardmerge.serve.flags.resolve_benign`'s guess).
        flag_entities: token task -> the entity types that flag a text (default: any).
        aggregation: how token heads group word pieces into entities (``first`` or ``simple``).
        api_key: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>``
            (checked before the body is read); an empty or blank key is an error.
        body_timeout: seconds within which a request's whole body must arrive (else 408).
        inference_timeout: seconds within which a request's texts must be classified, from the moment
            they are queued (else 504 ``inference_timeout``, never a verdict).
        model_name: the model's name in the KServe v2 routes (:mod:`guardmerge.serve.v2`).

    Every field is checked when the settings are made (and again by
    :func:`~guardmerge.serve.app.create_app`): limits have upper bounds (:data:`SETTING_RANGES`,
    ``max_wait_ms`` <= 10000, timeouts <= 3600 s), and NaN or infinite numbers are refused.
    """

    max_texts: int = field(default=64, metadata=cli_flag("Most texts per request."))
    max_chars: int = field(default=4000, metadata=cli_flag("Most characters per text."))
    max_batch: int = field(default=32, metadata=cli_flag("Most texts per encoder pass (micro-batch)."))
    max_wait_ms: float = field(default=5.0, metadata=cli_flag("Longest wait for a fuller micro-batch (ms)."))
    max_queue: int = field(default=4096, metadata=cli_flag("Most texts waiting for a batch before 503 overloaded."))
    thresholds: dict[str, float | None] = field(
        default_factory=dict,
        metadata=cli_flag(
            "Flag threshold per task, e.g. --threshold injection=0.8 (or emotion=off), or per label of a "
            "sequence head: --threshold toxicity.insult=0.7 (wins over its task's).",
            name="--threshold",
            cli_type=_REPEATED,
            parse=_thresholds,
        ),
    )
    default_threshold: float = field(default=0.5, metadata=cli_flag("Flag threshold of the other tasks."))
    api_key: str | None = field(
        default=None,
        metadata=cli_flag(
            "Require 'Authorization: Bearer KEY' on /v1/* and /metrics (/healthz stays open).", envvar=API_KEY_ENV
        ),
    )
    body_timeout: float = field(
        default=30.0, metadata=cli_flag("Seconds a request has to send its whole body; then 408 request_timeout.")
    )
    benign: dict[str, list[str]] = field(
        default_factory=dict,
        metadata=cli_flag(
            "Benign labels of a multi-label head (never flag), e.g. --benign emotions=neutral,joy. Default: "
            "labels named neutral, benign, safe, clean, none, normal, or starting with non/not.",
            cli_type=_REPEATED,
            parse=_label_lists("--benign"),
        ),
    )
    flag_entities: dict[str, list[str]] = field(
        default_factory=dict,
        metadata=cli_flag(
            "Entity types that flag a text for a token head, e.g. --flag-entities pii=PER,LOC (default: any).",
            cli_type=_REPEATED,
            parse=_label_lists("--flag-entities"),
        ),
    )
    aggregation: str = field(
        default="first",
        metadata=cli_flag("Token heads: how word pieces become entities, first or simple (as transformers)."),
    )
    inference_timeout: float = field(
        default=30.0,
        metadata=cli_flag("Seconds a request's texts may take to be classified; then 504 inference_timeout."),
    )
    model_name: str = field(
        default="guardmerge",
        metadata=cli_flag(
            "The model's name in the Open Inference Protocol (KServe v2) routes, /v2/models/NAME/infer "
            "(letters, digits, '.', '_', '-')."
        ),
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`GuardmergeError` (naming the field and its flag) for a value out of range."""
        for name, (low, high) in SETTING_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise GuardmergeError(f"{name} ({_flag(name)}) must be an integer from {low} to {high} (got {value!r})")
        wait = self.max_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_WAIT_MS:
            raise GuardmergeError(
                f"max_wait_ms (--max-wait-ms) must be a number from 0 to {MAX_WAIT_MS:g} (got {wait!r})"
            )
        check_seconds("body_timeout", self.body_timeout)
        check_seconds("inference_timeout", self.inference_timeout)
        if not (isinstance(self.default_threshold, (int, float)) and 0.0 <= self.default_threshold <= 1.0):
            raise GuardmergeError(
                f"default_threshold (--default-threshold) {self.default_threshold!r} is outside [0, 1]"
            )
        for key, value in self.thresholds.items():
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise GuardmergeError(f"threshold '{key}' (--threshold) {value!r} is outside [0, 1]")
        check_api_key(self.api_key, "the API key (api_key)")
        name = self.model_name
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
            raise GuardmergeError(
                f"model_name (--model-name) {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )

    def threshold(self, task: str) -> float | None:
        """``task``'s threshold: its own here, else ``default_threshold``."""
        return self.thresholds.get(task, self.default_threshold)

    def label_threshold(self, task: str, label: str, stored: Mapping[str, float] | None = None) -> float | None:
        """``label``'s threshold: ``task.label`` here, else ``task`` here, else the head's
        ``stored`` threshold of the label, else ``default_threshold``."""
        key = f"{task}.{label}"
        if key in self.thresholds:
            return self.thresholds[key]
        if task in self.thresholds:
            return self.thresholds[task]
        return float((stored or {}).get(label, self.default_threshold))


def check_api_key(key: str | None, source: str = "the API key") -> None:
    """Refuse a key that is empty, blank or padded with whitespace (an unset variable expands to '')."""
    if key is None:
        return
    if not key.strip():
        raise GuardmergeError(
            f"{source} is empty or blank (an unset variable?): give a real key, or none at all to serve without auth"
        )
    if key != key.strip():
        raise GuardmergeError(f"{source} starts or ends with whitespace, so no client could send it: strip it")


def public_model_name(value: str) -> str:
    """What ``/v1/model`` shows of a base model: a local path's last component, a hub id as given."""
    text = value.strip()
    for flavour in (PurePosixPath, PureWindowsPath):
        path = flavour(text)
        if path.is_absolute() or text.startswith(("~", "./", "../", ".\\", "..\\")):
            return path.name or text
    return text
