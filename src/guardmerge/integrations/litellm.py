"""A LiteLLM guardrail backed by one merged model: every head on a call's texts in one pass.

LiteLLM (PyPI ``litellm``, extra ``guardmerge[litellm]``) runs custom guardrails around the calls
its proxy and SDK make. :class:`GuardmergeGuardrail` is one: before the call (``pre_call``, or
``during_call``) it classifies the request's texts with every head of a merged model, and after it
(``post_call``) the answer's texts, streamed answers included (the stream is held back until it
has been checked). It runs a local model (a merged model folder, ``backend: torch``, or a folder
written by ``guardmerge export-onnx``, ``backend: onnx``) or calls a running ``guardmerge serve``
(``api_base``). In the proxy's ``config.yaml``::

    guardrails:
      - guardrail_name: guardmerge
        litellm_params:
          guardrail: guardmerge.integrations.litellm.GuardmergeGuardrail
          mode: [pre_call, post_call]
          default_on: true
          model: /models/merged            # or api_base: http://guard:8000 (and api_key)
          thresholds: {injection: 0.8, sentiment: "off"}

**What is checked.** The text of every message, whatever its role (a client writes the whole
history, assistant turns included), string contents and the text parts of list contents
(tool results nested in them too), and the request's ``system``, ``instructions``, ``input``,
``prompt``, ``query`` and ``documents`` texts; of an answer, each choice's message (or text),
the Responses API's output and Anthropic content blocks. Images, audio, files and tool-call
arguments are not text the heads read: they pass unchecked. A text longer than ``chunk_chars``
is checked in overlapping windows, and a window the tokenizer cuts (longer than the model reads)
is halved until none is cut, so no tail goes unseen. All windows of a call run in one batched
pass (several only beyond 32 texts).

**Flags** follow the server's rules (:mod:`guardmerge.serve.rules`, :mod:`guardmerge.serve.verdicts`):
``thresholds`` (``task`` or ``task.label`` -> a number in [0, 1] or ``"off"``), ``default_threshold``,
``benign`` and ``flag_entities`` mean what ``guardmerge serve``'s ``--threshold``,
``--default-threshold``, ``--benign`` and ``--flag-entities`` mean, with the same errors. With
``api_base`` the server flags by its own settings, so these are refused there.

**Blocking.** A head that flags raises :class:`GuardmergeBlocked` (LiteLLM answers 400), naming
the head, the label and where: ``guardmerge blocked the request: head 'injection' flagged label
'injection' (score 0.97) in message 1 (user)``. A guard that cannot answer never lets a text
through: a head without a verdict (non-finite scores, a failed head), a backend that raises, a
timeout (``timeout``, default 10 s), a server that is down, answers an error or a malformed body,
or a request whose content cannot be read raises :class:`GuardmergeUnavailable` (503), and a text
that is not valid Unicode :class:`GuardmergeGuardrailError` (400, the server's ``invalid_text``
message). A bad configuration is a :class:`~guardmerge.errors.GuardmergeError` naming the
field, never the ``ValueError`` or ``TypeError`` on which LiteLLM's proxy starts without the guardrail.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import weakref
from collections.abc import AsyncGenerator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from guardmerge.errors import GuardmergeError, InvalidTextError, NonFiniteWeightsError

try:
    from litellm.exceptions import GuardrailRaisedException
    from litellm.integrations.custom_guardrail import CustomGuardrail
    from litellm.types.guardrails import GuardrailEventHooks, LitellmParams
except ModuleNotFoundError as exc:  # only LiteLLM's absence gets the install hint
    if (exc.name or "").split(".")[0] != "litellm":
        raise
    raise GuardmergeError("guardmerge.integrations.litellm needs LiteLLM: pip install 'guardmerge[litellm]'") from None

from guardmerge.serve.backends import BACKENDS, Backend, TorchBackend, load_backend
from guardmerge.serve.flags import normalise_texts, parse_thresholds
from guardmerge.serve.inference import TRUNCATED, HeadRunner, HealthState, bad_weights
from guardmerge.serve.rules import head_rules
from guardmerge.serve.schemas import (
    ClassifyResponse,
    HeadErrorVerdict,
    HeadVerdict,
    ModelInfo,
    MultiLabelVerdict,
    TextVerdict,
    TokenHeadInfo,
    TokenVerdict,
)
from guardmerge.serve.settings import MAX_TIMEOUT_S, ServeSettings, check_api_key
from guardmerge.serve.verdicts import verdicts

log = logging.getLogger(__name__)

_Answer = TypeVar("_Answer", bound=BaseModel)

__all__ = [
    "GuardmergeBlocked",
    "GuardmergeGuardrail",
    "GuardmergeGuardrailError",
    "GuardmergeUnavailable",
    "Text",
    "request_texts",
    "response_texts",
    "split_text",
    "stream_texts",
]

SUPPORTED_HOOKS = ("pre_call", "during_call", "post_call")
"""The LiteLLM modes (event hooks) the guardrail runs in."""
DEFAULT_TIMEOUT = 10.0
"""Seconds a check may take before the call is blocked (``timeout``)."""
DEFAULT_CHUNK_CHARS = 1000
"""Characters per window of a long text (``chunk_chars``)."""
OVERLAP = 100
"""Characters two neighbouring windows share, so a phrase on a boundary is seen whole by one."""
MAX_BATCH = 32
"""Most texts per pass of a local model."""
MAX_SPLITS = 16
"""Rounds of halving windows the tokenizer cut, before the call is blocked."""
_MAX_DEPTH = 12
"""Nesting of content (lists in parts in messages) read before the content counts as unreadable."""


# -- errors ------------------------------------------------------------------------------------------


class GuardmergeGuardrailError(GuardrailRaisedException, GuardmergeError):
    """The guardrail stopped a call; LiteLLM answers the client with ``status_code``.

    ``blocked_content`` is True only when a head judged the content (:class:`GuardmergeBlocked`).
    """

    def __init__(
        self, message: str, guardrail_name: str | None = None, status_code: int = 400, blocked_content: bool = False
    ) -> None:
        super().__init__(  # type: ignore[call-arg]  # LiteLLM's exception (read as Any by mypy: pyproject)
            guardrail_name=guardrail_name,
            message=message,
            should_wrap_with_default_message=False,
            status_code=status_code,
            blocked_content=blocked_content,
        )


class GuardmergeBlocked(GuardmergeGuardrailError):
    """A head flagged the call's content (400)."""

    def __init__(self, message: str, guardrail_name: str | None = None) -> None:
        super().__init__(message, guardrail_name, status_code=400, blocked_content=True)


class GuardmergeUnavailable(GuardmergeGuardrailError):
    """The guard gave no verdict, so the call is blocked (503): a guard fails closed."""

    def __init__(self, message: str, guardrail_name: str | None = None) -> None:
        super().__init__(message, guardrail_name, status_code=503, blocked_content=False)


class _Unreadable(Exception):
    """Content the guardrail cannot read (internal: becomes :class:`GuardmergeUnavailable`)."""


# -- texts of requests and answers --------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A text to check and where it came from (``message 1 (user)``, ``choice 0``, ``system``)."""

    text: str
    where: str


_TEXT_KEYS = ("text", "content", "output", "message", "delta")
"""Keys of a part, message, item, choice or chunk that hold its text (or parts holding text)."""


def _fields(value: Any) -> Mapping[str, Any] | None:
    """A mapping's or a pydantic model's fields; None for anything else."""
    if isinstance(value, Mapping):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        fields = dump()
        return fields if isinstance(fields, Mapping) else None
    return None


def _texts(value: Any, depth: int = 0) -> list[str]:
    """The texts in ``value``: a string, a list of parts or items, or a part, message, item, choice
    or chunk (its ``text``, ``content``, ``output``, ``message`` or ``delta``); numbers (token ids)
    hold none. Raises :class:`_Unreadable` for anything else."""
    if value is None or isinstance(value, (bool, int, float)):
        return []
    if isinstance(value, str):
        return [value]
    if depth > _MAX_DEPTH:
        raise _Unreadable(f"content nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _texts(item, depth + 1)]
    fields = _fields(value)
    if fields is None:
        raise _Unreadable(f"content of type {type(value).__name__}")
    return [t for key in _TEXT_KEYS for t in _texts(fields.get(key), depth + 1)]


def _read(value: Any, where: str) -> list[Text]:
    try:
        return [Text(t, where) for t in _texts(value)]
    except _Unreadable as exc:
        raise _Unreadable(f"{where}: {exc}") from None


def request_texts(data: Mapping[str, Any]) -> list[Text]:
    """The texts of a LiteLLM request body: every message's (any role), and ``system``,
    ``instructions``, ``input``, ``prompt``, ``query`` and ``documents``.

    Raises:
        GuardmergeUnavailable: content that cannot be read (it could not be checked).
    """
    out: list[Text] = []
    try:
        for key in ("system", "instructions"):
            out += _read(data.get(key), key)
        messages = data.get("messages")
        if messages is not None:
            if not isinstance(messages, (list, tuple)):
                raise _Unreadable(f"messages is a {type(messages).__name__}, not a list")
            for i, message in enumerate(messages):
                fields = _fields(message)
                if fields is None:
                    raise _Unreadable(f"message {i} is a {type(message).__name__}")
                out += _read(fields.get("content"), f"message {i} ({fields.get('role') or 'no role'})")
        for key in ("input", "prompt", "query", "documents"):
            out += _read(data.get(key), key)
    except _Unreadable as exc:
        raise GuardmergeUnavailable(f"guardmerge cannot read the request ({exc}), so it is blocked") from None
    return out


def response_texts(response: Any) -> list[Text]:
    """The texts of a LiteLLM answer: each choice's message or text (chat and text completions),
    the Responses API's ``output`` and Anthropic ``content`` blocks; none for answers without text
    (embeddings, images, files).

    Raises:
        GuardmergeUnavailable: content that cannot be read.
    """
    fields = _fields(response)
    if fields is None:
        return []
    out: list[Text] = []
    try:
        choices = fields.get("choices")
        for i, choice in enumerate(choices if isinstance(choices, (list, tuple)) else []):
            out += _read(choice, f"choice {i}")
        for key in ("output", "content"):
            out += _read(fields.get(key), key)
    except _Unreadable as exc:
        raise GuardmergeUnavailable(f"guardmerge cannot read the response ({exc}), so it is blocked") from None
    return out


def stream_texts(chunks: Sequence[Any]) -> list[Text]:
    """The text each choice of a streamed answer adds up to (chat-completion chunks' ``delta``, or
    the ``delta`` of Responses API and Anthropic stream events).

    Raises:
        GuardmergeUnavailable: a chunk that cannot be read.
    """
    parts: dict[int, list[str]] = {}
    try:
        for n, chunk in enumerate(chunks):
            fields = _fields(chunk)
            if fields is None:
                raise _Unreadable(f"stream chunk {n} is a {type(chunk).__name__}")
            choices = fields.get("choices")
            if isinstance(choices, (list, tuple)) and choices:
                for i, choice in enumerate(choices):
                    entry = _fields(choice) or {}
                    at = entry.get("index")
                    parts.setdefault(at if isinstance(at, int) else i, []).extend(_texts(entry.get("delta")))
            else:
                parts.setdefault(0, []).extend(_texts(fields.get("delta")))
    except _Unreadable as exc:
        raise GuardmergeUnavailable(f"guardmerge cannot read the streamed response ({exc}), so it is blocked") from None
    return [Text("".join(p), f"choice {i}") for i, p in sorted(parts.items())]


def split_text(text: str, size: int, overlap: int = OVERLAP) -> list[str]:
    """``text`` in windows of at most ``size`` characters, neighbours sharing ``overlap`` (at most a
    quarter of ``size``); a text that fits is one window."""
    if len(text) <= size:
        return [text]
    shared = min(overlap, size // 4)
    step = size - shared
    return [text[i : i + size] for i in range(0, len(text) - shared, step)]


def _halves(text: str) -> list[str]:
    """``text`` cut in two overlapping halves (a window the tokenizer cut)."""
    mid = len(text) // 2
    shared = min(OVERLAP, len(text) // 8)
    return [text[: mid + shared], text[mid - shared :]]


# -- the two ways to a verdict: a local model, or guardmerge serve --------------------------------------


@dataclass(frozen=True)
class _HeadFacts:
    """What naming a flag needs of a head: its benign labels and the entity types that flag (None: any)."""

    benign: frozenset[str]
    entities: frozenset[str] | None = None


class _LocalModel:
    """Every head's verdict from a model in this process, by the server's rules."""

    def __init__(self, backend: Backend, owned: bool, settings: ServeSettings, tasks: list[str] | None) -> None:
        rules = head_rules(backend, settings)  # the server's checks and errors
        self.tasks = tasks if tasks is not None else list(rules)
        self.asked = tasks
        self.rules = rules
        self.facts = {t: _HeadFacts(r.benign, r.entities) for t, r in rules.items()}
        self.max_chars: int | None = None
        self.runner = HeadRunner(backend, rules, settings.aggregation, HealthState())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardmerge-litellm")
        self.name = f"{getattr(backend, 'name', '?')} backend"

        def release(executor: ThreadPoolExecutor, backend: Backend, owned: bool) -> None:
            executor.shutdown(wait=False)
            if owned:
                backend.close()

        self._finalizer = weakref.finalize(self, release, self.executor, backend, owned)

    async def ready(self) -> None:
        """Nothing to fetch: the model is in this process."""

    async def classify(self, texts: Sequence[str]) -> list[TextVerdict]:
        """Each text's verdict, in passes of at most :data:`MAX_BATCH` texts on the worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run, list(texts))

    def _run(self, texts: list[str]) -> list[TextVerdict]:
        unique = list(dict.fromkeys(texts))
        found: dict[str, TextVerdict] = {}
        for start in range(0, len(unique), MAX_BATCH):
            batch = unique[start : start + MAX_BATCH]
            out = self.runner(batch, self.asked)
            truncated = out.pop(TRUNCATED, None)
            found.update(zip(batch, verdicts({t: out[t] for t in self.tasks}, self.rules, truncated)))
        return [found[t] for t in texts]

    def close(self) -> None:
        self._finalizer()


class _Server:
    """Every head's verdict from a running ``guardmerge serve`` (``POST /v1/classify``)."""

    def __init__(self, url: str, api_key: str | None, tasks: list[str] | None, timeout: float) -> None:
        self.url = url
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.asked = tasks
        self.timeout = timeout
        self.tasks: list[str] = list(tasks or [])
        self.facts: dict[str, _HeadFacts] = {}
        self.max_chars: int | None = None
        self.max_texts = 1
        self.name = f"guardmerge serve at {url}"
        self._info: ModelInfo | None = None

    async def ready(self) -> None:
        """Read the served heads and limits once (``GET /v1/model``)."""
        if self._info is not None:
            return
        info = self._parse(ModelInfo, await self._call("GET", "/v1/model"), "/v1/model")
        heads = [h.task for h in info.heads]
        unknown = [t for t in self.tasks if t not in heads]
        if unknown:
            raise GuardmergeUnavailable(
                f"tasks: unknown task(s) {', '.join(repr(t) for t in unknown)}; the model served at {self.url} "
                f"has: {', '.join(heads)}"
            )
        self.tasks = self.tasks or heads
        self.facts = {
            h.task: _HeadFacts(
                frozenset(h.benign),
                frozenset(h.flag_entities) if isinstance(h, TokenHeadInfo) and h.flag_entities is not None else None,
            )
            for h in info.heads
        }
        self.max_chars, self.max_texts = info.limits.max_chars, info.limits.max_texts
        self._info = info

    async def classify(self, texts: Sequence[str]) -> list[TextVerdict]:
        """Each text's verdict, in requests of at most the server's ``max_texts`` texts."""
        out: list[TextVerdict] = []
        for start in range(0, len(texts), self.max_texts):
            batch = list(texts[start : start + self.max_texts])
            body = {"texts": batch, **({"tasks": self.asked} if self.asked else {})}
            answer = self._parse(ClassifyResponse, await self._call("POST", "/v1/classify", body), "/v1/classify")
            missing = [t for t in self.tasks if any(t not in r.heads for r in answer.results)]
            if len(answer.results) != len(batch) or missing:
                raise GuardmergeUnavailable(
                    f"{self.name} answered {len(answer.results)} results for {len(batch)} texts"
                    + (f", without head(s) {', '.join(missing)}" if missing else "")
                )
            out += answer.results
        return out

    def _parse(self, schema: type[_Answer], payload: Any, path: str) -> _Answer:
        """``payload`` as ``schema``; :class:`GuardmergeUnavailable` naming the first problem."""
        try:
            return schema.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "the body"
            raise GuardmergeUnavailable(
                f"{self.name} answered {path} with a malformed body ({where}: {first['msg']})"
            ) from None

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON answer of ``method path``; :class:`GuardmergeUnavailable` for any failure."""
        try:
            async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers) as client:
                answer = await client.request(method, self.url + path, json=body)
        except httpx.HTTPError as exc:
            raise GuardmergeUnavailable(
                f"cannot reach {self.name} ({type(exc).__name__}: {_one_line(str(exc)) or 'no detail'})"
            ) from None
        try:
            payload = answer.json()
        except ValueError:
            payload = None
        if answer.status_code != 200:
            error = payload.get("error") if isinstance(payload, dict) else None
            what = (
                f"{error.get('code')}: {error.get('message')}" if isinstance(error, dict) else answer.text or "no body"
            )
            raise GuardmergeUnavailable(f"{self.name} answered {answer.status_code} ({_one_line(what)})")
        if payload is None:
            raise GuardmergeUnavailable(f"{self.name} answered {path} with a body that is not JSON")
        return payload

    def close(self) -> None:
        """Nothing held between calls."""


# -- the guardrail ------------------------------------------------------------------------------------


def _litellm_keys() -> frozenset[str]:
    """The parameters LiteLLM may pass a guardrail: its ``litellm_params`` fields (the proxy passes
    each one set or with a default) and :class:`CustomGuardrail`'s own."""
    return frozenset(LitellmParams.model_fields) | frozenset(inspect.signature(CustomGuardrail.__init__).parameters)


def _threshold_items(thresholds: Any) -> dict[str, float | None]:
    """``thresholds`` (task or task.label -> number, ``"off"`` or None; YAML's unquoted ``off`` is
    False) through the server's ``--threshold`` parser, with its errors."""
    if not isinstance(thresholds, Mapping):
        raise GuardmergeError(f"thresholds must map task (or task.label) to a number or 'off', got {thresholds!r}")
    items = []
    for key, value in thresholds.items():
        if value is None or value is False:
            value = "off"
        elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise GuardmergeError(f"thresholds: '{key}' must be a number in [0, 1] or 'off', got {value!r}")
        items.append(f"{key}={value}")
    try:
        return parse_thresholds(items)
    except GuardmergeError as exc:
        raise GuardmergeError(f"thresholds: {exc}") from None


def _label_lists(field: str, given: Any) -> dict[str, list[str]]:
    """``benign`` or ``flag_entities``: task -> a list of names (a string is one name)."""
    if not isinstance(given, Mapping):
        raise GuardmergeError(f"{field} must map a task to a list of labels, got {given!r}")
    out = {}
    for task, names in given.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise GuardmergeError(f"{field}: '{task}' must be a list of labels, got {given[task]!r}")
        out[str(task)] = list(names)
    return out


def _check_hooks(event_hook: Any) -> None:
    """Refuse a mode the guardrail does not run in (LiteLLM's own check raises the ValueError on
    which its proxy starts without the guardrail)."""
    fields = _fields(event_hook) if not isinstance(event_hook, (str, list, tuple)) else None
    if fields is not None:  # a tag-based Mode: every hook it can pick
        named = [v for tag in (fields.get("tags") or {}).values() for v in ([tag] if isinstance(tag, str) else tag)]
        default = fields.get("default")
        hooks = named + ([default] if isinstance(default, str) else list(default or []))
    else:
        hooks = [event_hook] if isinstance(event_hook, str) else list(event_hook) if event_hook is not None else []
    bad = [h for h in hooks if str(getattr(h, "value", h)) not in SUPPORTED_HOOKS]
    if bad or event_hook is None or not hooks:
        shown = ", ".join(repr(getattr(h, "value", h)) for h in bad) or repr(event_hook)
        raise GuardmergeError(f"mode {shown} is not supported: use one or more of {', '.join(SUPPORTED_HOOKS)}")


def _check_number(field: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int if integer else (int, float)))
    if not ok or math.isnan(value) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise GuardmergeError(f"{field} must be {kind} from {low:g} to {high:g}, got {value!r}")


def _open(model: Any, backend: str, max_length: int | None, threads: int | None) -> tuple[Backend, bool]:
    """The backend to run, and whether it was opened here (and is closed with the guardrail)."""
    if isinstance(model, (str, Path)):
        return load_backend(model, backend, max_length=max_length, threads=threads), True
    from guardmerge.models.multihead import MultiHeadModel

    if isinstance(model, MultiHeadModel):
        if backend != "torch":
            raise GuardmergeError(f"backend '{backend}' needs a model folder, not a loaded model")
        return TorchBackend(model, max_length=max_length), False
    if isinstance(model, Backend):
        return model, False
    raise GuardmergeError(f"model must be a model folder, a MultiHeadModel or a Backend, got {type(model).__name__}")


class GuardmergeGuardrail(CustomGuardrail):
    """A LiteLLM guardrail that checks a call's texts with every head of a merged model (see the
    module docstring).

    Args:
        guardrail_name: the name requests and LiteLLM's logs know it by.
        model: a merged model folder, a folder written by ``guardmerge export-onnx`` (``backend:
            onnx``), a loaded ``MultiHeadModel`` or a ``Backend``.
        api_base: instead of ``model``, the URL of a running ``guardmerge serve``.
        api_key: the server's API key (sent as ``Authorization: Bearer``).
        backend: ``torch`` or ``onnx`` (a merged folder is then exported to a temporary folder).
        tasks: the heads to run (default: every head).
        thresholds: ``task`` or ``task.label`` -> flag threshold in [0, 1], or ``"off"``.
        default_threshold: the threshold of the other heads.
        benign: task -> labels that never flag (default: the head's stored ones, else guessed).
        flag_entities: token task -> the entity types that flag (default: any).
        max_length: tokens per text the model reads (default: its limit, at most 512).
        threads: inference threads (default: the runtime's).
        chunk_chars: characters per window of a long text.
        event_hook: the LiteLLM mode(s): ``pre_call``, ``during_call``, ``post_call`` (config: ``mode``).
        default_on: run on every call, not only those that name the guardrail.
        timeout: seconds a check may take before the call is blocked.
        kwargs: LiteLLM's other ``litellm_params`` (its proxy passes all of them), for
            :class:`CustomGuardrail`; a key that is neither LiteLLM's nor the guardrail's is an error.

    Raises:
        GuardmergeError: a bad or missing field (naming it), a model that cannot be opened or whose
            weights hold NaN or infinity.
    """

    def __init__(
        self,
        guardrail_name: str | None = "guardmerge",
        *,
        model: Any = None,
        api_base: str | None = None,
        api_key: str | None = None,
        backend: str | None = None,
        tasks: Sequence[str] | None = None,
        thresholds: Mapping[str, Any] | None = None,
        default_threshold: float | None = None,
        benign: Mapping[str, Sequence[str]] | None = None,
        flag_entities: Mapping[str, Sequence[str]] | None = None,
        max_length: int | None = None,
        threads: int | None = None,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        event_hook: Any = "pre_call",
        default_on: bool = False,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        given = {
            "thresholds": thresholds,
            "default_threshold": default_threshold,
            "benign": benign,
            "flag_entities": flag_entities,
            "backend": backend,
            "max_length": max_length,
            "threads": threads,
        }
        self._check_fields(kwargs, event_hook, model, api_base, api_key, given)
        wait = DEFAULT_TIMEOUT if timeout is None else timeout
        _check_number("timeout", wait, 1e-3, MAX_TIMEOUT_S)
        _check_number("chunk_chars", chunk_chars, 16, 1_000_000, integer=True)
        if tasks is not None and (
            isinstance(tasks, str) or not isinstance(tasks, Sequence) or not all(isinstance(t, str) for t in tasks)
        ):
            raise GuardmergeError(f"tasks must be a list of head names, got {tasks!r}")
        if tasks is not None and not tasks:
            raise GuardmergeError("tasks is empty: name at least one head, or leave it out for every head")
        chosen = list(dict.fromkeys(tasks)) if tasks is not None else None
        try:  # modes are checked above: LiteLLM's own check raises ValueError
            super().__init__(
                guardrail_name=guardrail_name, event_hook=event_hook, default_on=default_on, timeout=wait, **kwargs
            )
        except (ValueError, TypeError) as exc:  # e.g. a bad stream_scope: never the errors LiteLLM skips
            raise GuardmergeError(f"guardrail '{guardrail_name}': {_one_line(str(exc))}") from None
        self.check_timeout = float(wait)
        self.chunk_chars = chunk_chars
        self._checker: _LocalModel | _Server
        if api_base is not None:
            self._checker = _Server(api_base.rstrip("/"), api_key, chosen, float(wait))
        else:
            self._checker = self._local(model, chosen, given)
        log.info(
            "LiteLLM guardrail '%s' (%s): heads %s, modes %s",
            guardrail_name,
            self._checker.name,
            ", ".join(self._checker.tasks) or "(every head served)",
            event_hook,
        )

    @staticmethod
    def _check_fields(
        kwargs: Mapping[str, Any], event_hook: Any, model: Any, api_base: Any, api_key: Any, given: Mapping[str, Any]
    ) -> None:
        """Refuse unknown keys, fail-open settings, unsupported modes and a missing or doubled source."""
        unknown = sorted(set(kwargs) - _litellm_keys())
        if unknown:
            raise GuardmergeError(
                f"unknown parameter(s) {', '.join(repr(k) for k in unknown)} for GuardmergeGuardrail; its own are "
                "model, api_base, api_key, backend, tasks, thresholds, default_threshold, benign, flag_entities, "
                "max_length, threads, chunk_chars, timeout"
            )
        if kwargs.get("unreachable_fallback", "fail_closed") != "fail_closed" or kwargs.get("fail_on_error") is False:
            raise GuardmergeError(
                "unreachable_fallback / fail_on_error: guardmerge always fails closed (a guard that cannot "
                "answer blocks the call); remove the setting"
            )
        _check_hooks(event_hook)
        if (model is None) == (api_base is None):
            raise GuardmergeError(
                "give exactly one of model (a merged model folder or an ONNX export) and api_base (the URL of "
                f"a running guardmerge serve); got {'both' if model is not None else 'neither'}"
            )
        if api_base is not None:
            parts = urlsplit(api_base) if isinstance(api_base, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
                raise GuardmergeError(f"api_base must be an http(s) URL of guardmerge serve, got {api_base!r}")
            if api_key is not None and not isinstance(api_key, str):
                raise GuardmergeError("api_key must be a string")
            check_api_key(api_key, "api_key")
            local = [k for k, v in given.items() if v is not None]
            if local:
                raise GuardmergeError(
                    f"{', '.join(local)}: set for a local model; with api_base the server flags by its own "
                    "settings (guardmerge serve --threshold, --benign, ...)"
                )
        elif api_key is not None:
            raise GuardmergeError("api_key is for api_base (a guardmerge serve URL); a local model needs none")

    @staticmethod
    def _local(model: Any, tasks: list[str] | None, given: Mapping[str, Any]) -> _LocalModel:
        """Check the flag settings the server's way, then open the model."""
        backend = "torch" if given["backend"] is None else given["backend"]
        if backend not in BACKENDS:
            raise GuardmergeError(f"backend: unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
        max_length, threads = given["max_length"], given["threads"]
        for field in ("max_length", "threads"):
            if given[field] is not None:
                _check_number(field, given[field], 1, 1_000_000, integer=True)
        default_threshold = 0.5 if given["default_threshold"] is None else given["default_threshold"]
        _check_number("default_threshold", default_threshold, 0, 1)
        settings = ServeSettings(
            thresholds=_threshold_items(given["thresholds"] or {}),
            default_threshold=float(default_threshold),
            benign=_label_lists("benign", given["benign"] or {}),
            flag_entities=_label_lists("flag_entities", given["flag_entities"] or {}),
        )
        try:
            opened, owned = _open(model, backend, max_length, threads)
        except GuardmergeError as exc:
            raise GuardmergeError(f"model: {exc}") from None
        except (OSError, ValueError, TypeError, RuntimeError) as exc:  # never the ValueError that LiteLLM skips
            raise GuardmergeError(
                f"model: cannot open {model!r}: {type(exc).__name__}: {_one_line(str(exc))}"
            ) from None
        try:
            bad = bad_weights(opened)
            if bad:
                raise NonFiniteWeightsError(bad)
            heads = list(opened.tasks)
            unknown = [t for t in tasks or [] if t not in heads]
            if unknown:  # the server's unknown_task message
                raise GuardmergeError(
                    f"tasks: unknown task(s) {', '.join(repr(t) for t in unknown)}; this model has: {', '.join(heads)}"
                )
            return _LocalModel(opened, owned, settings, tasks)
        except BaseException:
            if owned:
                opened.close()
            raise

    @classmethod
    def get_supported_event_hooks(cls) -> list[GuardrailEventHooks] | None:
        """The modes LiteLLM's UI offers for this guardrail."""
        return [GuardrailEventHooks(h) for h in SUPPORTED_HOOKS]

    @property
    def tasks(self) -> list[str]:
        """The heads run (with ``api_base``: empty until the server's heads have been read)."""
        return list(self._checker.tasks)

    # -- checking ------------------------------------------------------------------------------------

    async def check(self, texts: Sequence[Text], what: str = "request") -> None:
        """Raise when a head flags one of ``texts`` or the guard cannot answer; return when none flags.

        Raises:
            GuardmergeBlocked: a head flagged a text (naming the head, the label and where).
            GuardmergeUnavailable: the guard gave no verdict (naming why).
            GuardmergeGuardrailError: a text that is not valid Unicode (the server's message).
        """
        texts = [t for t in texts if t.text.strip()]
        if not texts:
            return
        normal, invalid = normalise_texts([t.text for t in texts])  # the server's rule and message
        if invalid:
            bad: InvalidTextError = invalid[0]
            why = str(bad).replace(f"text {bad.index}", texts[bad.index].where, 1)
            raise GuardmergeGuardrailError(f"guardmerge cannot check the {what}: {why}", self.guardrail_name)
        sources = [Text(n, t.where) for n, t in zip(normal, texts)]
        try:
            results = await asyncio.wait_for(self._verdicts(sources), self.check_timeout)
        except GuardmergeGuardrailError as exc:
            why = exc.message
        except asyncio.TimeoutError:
            why = f"no verdict within {self.check_timeout:g} s (timeout)"
        except Exception as exc:  # a guard that fails never passes the call
            why = f"{type(exc).__name__}: {_one_line(str(exc))}"
        else:
            _decide(results, self._checker.facts, what, self.guardrail_name)
            return
        log.error(
            "guardrail '%s' (%s) gave no verdict on the %s: %s", self.guardrail_name, self._checker.name, what, why
        )
        message = f"guardmerge could not check the {what}, so it is blocked: {why}"
        raise GuardmergeUnavailable(message, self.guardrail_name)

    async def _verdicts(self, sources: list[Text]) -> list[tuple[Text, TextVerdict]]:
        """Each window's verdict: long texts in windows, windows the tokenizer cut halved, until
        none is cut or one flags."""
        await self._checker.ready()
        size = min(self.chunk_chars, self._checker.max_chars or self.chunk_chars)
        pending = [Text(w, s.where) for s in sources for w in split_text(s.text, size)]
        done: list[tuple[Text, TextVerdict]] = []
        for _ in range(MAX_SPLITS):
            answers = await self._checker.classify([p.text for p in pending])
            if len(answers) != len(pending):
                raise GuardmergeUnavailable(f"{len(answers)} verdicts for {len(pending)} texts")
            done += zip(pending, answers)
            if any(v.flagged for v in answers):
                return done
            cut = [(p, v) for p, v in zip(pending, answers) if v.truncated]
            if not cut:
                return done
            if any(len(p.text) < 2 for p, _ in cut):
                break
            pending = [Text(h, p.where) for p, _ in cut for h in _halves(p.text)]
        raise GuardmergeUnavailable("a text is longer than the model reads even in small windows")

    # -- LiteLLM's hooks -----------------------------------------------------------------------------

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any
    ) -> dict[str, Any] | None:
        """Before the call (mode ``pre_call``): block it when a head flags a text of the request."""
        await self.check(request_texts(data), "request")
        return data

    async def async_moderation_hook(self, data: dict, user_api_key_dict: Any, call_type: Any) -> Any:
        """Beside the call (mode ``during_call``): block it when a head flags a text of the request."""
        await self.check(request_texts(data), "request")
        return None

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any, response: Any) -> Any:
        """After the call (mode ``post_call``): block the answer when a head flags one of its texts."""
        await self.check(response_texts(response), "response")
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict
    ) -> AsyncGenerator[Any, None]:
        """A streamed answer (mode ``post_call``, proxy): held back until the whole of it has been
        checked, then passed on; blocked when a head flags it."""
        chunks = [chunk async for chunk in response]
        await self.check(stream_texts(chunks), "response")
        for chunk in chunks:
            yield chunk

    def close(self) -> None:
        """Release the model (and a temporary ONNX export) now; LiteLLM never calls this."""
        self._checker.close()


# -- naming the flag ----------------------------------------------------------------------------------


def _top(probabilities: Mapping[str, float], benign: frozenset[str], among: Sequence[str] | None = None) -> str:
    """The most probable label that is not benign (of ``among``, when given and not empty)."""
    names = [n for n in (among or probabilities) if n not in benign] or list(probabilities)
    return max(names, key=lambda n: probabilities.get(n, 0.0))


def _flag(task: str, head: Any, facts: _HeadFacts | None) -> str:
    """What a flagging head found: its label (or entity type) and score."""
    benign = facts.benign if facts is not None else frozenset()
    if isinstance(head, HeadVerdict):
        label = _top(head.probabilities, benign)
        return f"head '{task}' flagged label '{label}' (score {head.probabilities.get(label, head.score):.2f})"
    if isinstance(head, MultiLabelVerdict):
        label = _top(head.probabilities, benign, head.labels)
        return f"head '{task}' flagged label '{label}' (score {head.probabilities[label]:.2f})"
    if isinstance(head, TokenVerdict) and head.entities:
        types = facts.entities if facts is not None else None
        found = [e for e in head.entities if types is None or e.label in types] or head.entities
        entity = max(found, key=lambda e: e.score)
        return f"head '{task}' flagged entity '{entity.label}' (score {entity.score:.2f})"
    return f"head '{task}' flagged it"


def _decide(
    results: Sequence[tuple[Text, TextVerdict]], facts: Mapping[str, _HeadFacts], what: str, name: str | None
) -> None:
    """Raise for the first flag (:class:`GuardmergeBlocked`), else for the first head without a
    verdict (:class:`GuardmergeUnavailable`); return when every head answered and none flagged."""
    flags: list[str] = []
    errors: list[str] = []
    for text, verdict in results:
        for task, head in verdict.heads.items():
            if isinstance(head, HeadErrorVerdict):
                errors.append(
                    f"head '{task}' gave no verdict on {text.where} ({head.error.code}: {head.error.message})"
                )
            elif head.flagged:
                flags.append(f"{_flag(task, head, facts.get(task))} in {text.where}")
        if verdict.flagged and not any(h.flagged for h in verdict.heads.values()):
            flags.append(f"the guard flagged {text.where}")  # never reached by the server's rules
    if flags:
        log.info("guardrail '%s' blocked the %s: %s", name, what, flags[0])
        raise GuardmergeBlocked(f"guardmerge blocked the {what}: {flags[0]}{_and_more(flags)}", name)
    if errors:
        log.error("guardrail '%s' gave no verdict on the %s: %s", name, what, errors[0])
        raise GuardmergeUnavailable(
            f"guardmerge could not check the {what}, so it is blocked: {errors[0]}{_and_more(errors)}", name
        )


def _and_more(found: Sequence[str]) -> str:
    return f" (and {len(found) - 1} more)" if len(found) > 1 else ""


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
