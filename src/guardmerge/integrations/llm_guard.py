"""LLM Guard input scanners backed by one merged model: one scanner per head, one pass per prompt.

LLM Guard (PyPI ``llm-guard``) runs a list of scanners over a prompt with ``scan_prompt``; each of
its classifier scanners is a model of its own. :func:`scanners` returns one scanner per head of
a merged guardmerge model, following LLM Guard's input-scanner protocol (duck-typed: nothing is
imported from ``llm_guard``), so a scanner list is swapped in one line::

    input_scanners = guardmerge.integrations.llm_guard.scanners("merged/", thresholds={"injection": 0.8})
    sanitized_prompt, results_valid, results_score = llm_guard.scan_prompt(input_scanners, prompt)

Each scanner's ``scan(prompt)`` returns ``(prompt, is_valid, risk_score)``: the prompt
unchanged, ``is_valid`` False when the head flags the prompt, and the risk score LLM Guard
derives from a score and a threshold (:func:`risk_score`). The score is the highest probability
among the head's non-benign labels (softmax; a multi-label head's sigmoid probabilities) and the
head flags at or above its threshold: the server's rule (:mod:`guardmerge.serve.flags`). Benign
labels are those given in ``benign=``, else the head's stored ones, else a logged guess from the
names that never silences a label; a single-label head whose benign labels cannot be told is
refused until they are given. Token-classification heads are not classifier scanners: they get
none. LLM Guard's own scanners flag strictly above theirs, so the two can differ on a score
exactly at the threshold.

A guard that cannot answer never lets a prompt through: a model whose weights hold NaN or
infinity is refused when the scanners are built, a pass that produces non-finite scores or
fails raises (``scan_prompt`` then fails), and :func:`prefetch` runs each prompt of a failing
batch on its own, so one bad prompt (a lone surrogate) fails only itself.

The scanners of one :func:`scanners` call share a :class:`SharedPass`: the first scanner that
sees a prompt runs every head in one forward pass, and the others read the result, cached by the
exact text (bounded, least recently used first out, thread-safe). Each scanner's class is named
after its head (``injection`` -> ``Injection``, ``prompt_injection`` -> ``PromptInjection``),
since ``scan_prompt`` keys its results by class name; heads whose names give the same class name
(``prompt_injection`` and ``prompt-injection``) are refused, since one verdict would overwrite
the other. :func:`prefetch` runs a batch of prompts
in batched passes first (prompts of similar length together, so little of a pass is padding),
so prompts arriving together share passes too.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from guardmerge.errors import GuardmergeError, NonFiniteWeightsError
from guardmerge.models.benign import resolve_benign
from guardmerge.models.head_kinds import DEFAULT_KIND, HeadKind, head_kind
from guardmerge.serve.backends import BACKENDS, Backend, TorchBackend, load_backend
from guardmerge.serve.flags import flag_score, is_flagged, normalise_texts

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
"""A head's threshold when ``thresholds`` does not name it (the server's default)."""
DEFAULT_CACHE_SIZE = 1024
"""Prompts whose results a :class:`SharedPass` keeps."""


def risk_score(score: float, threshold: float) -> float:
    """LLM Guard's risk score of ``score`` against ``threshold``, in [-1, 1] at one decimal.

    Above the threshold it is the distance to the threshold as a fraction of the room above it
    (``(score - threshold) / (1 - threshold)``); at or below, the same as a fraction of the room
    below it (``(score - threshold) / threshold``, so 0 at the threshold and -1 at score 0).
    A threshold of 0 gives 0 for a score of 0.
    """
    gap = score - threshold
    room = (1.0 - threshold) if gap > 0 else threshold
    value = gap / room if room > 0 else 0.0
    return min(1.0, max(-1.0, round(value, 1)))


@dataclass(frozen=True)
class HeadResult:
    """One head's output for one prompt.

    Attributes:
        label: the most probable label.
        score: the highest probability among the non-benign labels (None: every label is benign).
        probabilities: every label's probability (softmax; sigmoid for a multi-label head), in label order.
    """

    label: str
    score: float | None
    probabilities: dict[str, float]


PASS_CHARS = 8192
"""Most padded characters per batched pass (about 2,000 tokens): a 2,000-character prompt runs
with at most three others."""


def length_batches(
    prompts: Sequence[str], batch_size: int, waste: float = 1.3, max_chars: int = PASS_CHARS
) -> list[list[str]]:
    """``prompts`` sorted by length and cut into passes of at most ``batch_size``, a pass closed
    before its padded size (prompts x the longest) would pass ``waste`` times its real size or
    ``max_chars`` characters.

    A batch is padded to its longest prompt, and on a CPU a pass costs about its padded size, so
    one long prompt among short ones would multiply the cost of the whole batch; and attention
    memory grows with prompts x length^2, so long prompts go in small passes (peak memory stays
    near that of short batches). Characters stand in for tokens.
    """
    out: list[list[str]] = []
    chunk: list[str] = []
    total = 0
    for prompt in sorted(prompts, key=len):
        size = max(len(prompt), 1)
        padded = (len(chunk) + 1) * size
        if chunk and (len(chunk) == batch_size or padded > waste * (total + size) or padded > max_chars):
            out.append(chunk)
            chunk, total = [], 0
        chunk.append(prompt)
        total += size
    if chunk:
        out.append(chunk)
    return out


class SharedPass:
    """Every head's result per prompt, from one forward pass, cached by the exact text.

    Args:
        backend: the model (:class:`~guardmerge.serve.backends.Backend`).
        tasks: the heads to run.
        cache_size: how many prompts' results are kept (least recently used dropped first).
        batch_size: most prompts per pass in :meth:`results`.
        owns_backend: close the backend with this object (it was opened for it).
        benign: head -> its benign labels (default: the head's stored ones, else a logged guess).
    """

    def __init__(
        self,
        backend: Backend,
        tasks: Sequence[str],
        cache_size: int = DEFAULT_CACHE_SIZE,
        batch_size: int = 32,
        owns_backend: bool = False,
        benign: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if cache_size < 1:
            raise GuardmergeError(f"cache_size must be at least 1 (got {cache_size})")
        if batch_size < 1:
            raise GuardmergeError(f"batch_size must be at least 1 (got {batch_size})")
        self.backend = backend
        self.tasks = list(tasks)
        self.labels = {t: backend.labels(t) for t in self.tasks}
        problem_of = getattr(backend, "problem", None)
        self.kinds: dict[str, HeadKind] = {
            t: head_kind(str(problem_of(t)) if callable(problem_of) else DEFAULT_KIND) for t in self.tasks
        }
        stored = getattr(backend, "benign", None)
        given = dict(benign or {})
        self.benign: dict[str, set[int]] = {}
        for t in self.tasks:
            names = self.labels[t]
            told = given[t] if t in given else stored(t) if callable(stored) else None
            chosen = resolve_benign(t, names, self.kinds[t].name, told, f"benign={{'{t}': [LABEL, ...]}}")
            self.benign[t] = {i for i, n in enumerate(names) if n in chosen}
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.passes = 0
        """Forward passes run so far (one per prompt, or per batch in :meth:`results`)."""
        self._cache: OrderedDict[str, dict[str, HeadResult]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._run_lock = threading.Lock()  # one pass at a time: backends serve one thread
        self._finalizer = weakref.finalize(self, backend.close) if owns_backend else None

    def result(self, prompt: str) -> dict[str, HeadResult]:
        """Every head's result for ``prompt`` (a forward pass unless it is cached)."""
        hit = self._lookup(prompt)
        if hit is not None:
            return hit
        with self._run_lock:
            hit = self._lookup(prompt)  # another thread may have run it while this one waited
            if hit is not None:
                return hit
            out = self._run([prompt])[0]
            self._store(prompt, out)
            return out

    def results(self, prompts: Sequence[str]) -> list[dict[str, HeadResult]]:
        """Every head's result for each prompt, in order; the prompts not cached run in batched
        passes (:func:`length_batches`: at most ``batch_size``, similar lengths together) and are
        cached."""
        found = {p: r for p in dict.fromkeys(prompts) if (r := self._lookup(p)) is not None}
        failed: dict[str, Exception] = {}
        with self._run_lock:
            missing = [p for p in dict.fromkeys(prompts) if p not in found]
            for p in missing:  # run by another thread meanwhile
                if (r := self._lookup(p)) is not None:
                    found[p] = r
            missing = [p for p in missing if p not in found]
            for chunk in length_batches(missing, self.batch_size):
                try:
                    done = list(zip(chunk, self._run(chunk)))
                except Exception:  # isolate: each prompt of a failing batch on its own
                    done = []
                    for p in chunk:
                        try:
                            done.append((p, self._run([p])[0]))
                        except Exception as exc:
                            failed[p] = exc
                for p, r in done:
                    found[p] = r
                    self._store(p, r)
        bad = [p for p in prompts if p in failed]
        if bad:
            raise failed[bad[0]]
        return [found[p] for p in prompts]

    def clear(self) -> None:
        """Forget every cached result."""
        with self._cache_lock:
            self._cache.clear()

    def close(self) -> None:
        """Release the backend when this object opened it (temporary ONNX export, if any)."""
        if self._finalizer is not None:
            self._finalizer()

    def _lookup(self, prompt: str) -> dict[str, HeadResult] | None:
        with self._cache_lock:
            hit = self._cache.get(prompt)
            if hit is not None:
                self._cache.move_to_end(prompt)
            return hit

    def _store(self, prompt: str, result: dict[str, HeadResult]) -> None:
        with self._cache_lock:
            self._cache[prompt] = result
            self._cache.move_to_end(prompt)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _run(self, prompts: Sequence[str]) -> list[dict[str, HeadResult]]:
        texts, invalid = normalise_texts(prompts)  # the server's rule: NFC, lone surrogates refused
        if invalid:
            raise invalid[0]
        logits = self.backend.logits(texts, self.tasks)
        self.passes += 1
        out: list[dict[str, HeadResult]] = [{} for _ in prompts]
        for task in self.tasks:
            values = np.asarray(logits[task])
            if not np.isfinite(values).all():  # fail closed: no verdict from NaN or infinity
                raise GuardmergeError(f"the model produced non-finite scores for head '{task}'; no verdict given")
            names = self.labels[task]
            # the score: the top non-benign label's probability (softmax; a multi-label head's sigmoid)
            for row, probs in zip(out, self.kinds[task].activation(values)):
                row[task] = HeadResult(
                    label=names[int(probs.argmax())],
                    score=flag_score(probs, self.benign[task]),
                    probabilities={n: float(p) for n, p in zip(names, probs)},
                )
        return out


class HeadScanner:
    """An LLM Guard input scanner for one head of a merged model (see the module docstring).

    Args:
        task: the head.
        threshold: the head flags a prompt whose score is at or above this, in [0, 1].
        shared: the pass this scanner shares with the other heads' scanners.
    """

    def __init__(self, task: str, threshold: float, shared: SharedPass) -> None:
        self.task = task
        self.threshold = threshold
        self.shared = shared

    def scan(self, prompt: str) -> tuple[str, bool, float]:
        """``(prompt unchanged, is_valid, risk_score)``; an empty or blank prompt is valid with
        risk -1, as in LLM Guard's scanners, and runs no pass."""
        if prompt.strip() == "":
            return prompt, True, -1.0
        head = self.shared.result(prompt)[self.task]
        flagged = is_flagged(head.score, self.threshold)
        if flagged:
            log.debug("head '%s' flags the prompt (score %.3f, threshold %.3f)", self.task, head.score, self.threshold)
        return prompt, not flagged, risk_score(head.score or 0.0, self.threshold)

    def result(self, prompt: str) -> HeadResult:
        """This head's label, score and probabilities for ``prompt`` (cached like :meth:`scan`)."""
        return self.shared.result(prompt)[self.task]

    def prefetch(self, prompts: Sequence[str]) -> None:
        """Run ``prompts`` in batched passes now, so later scans of them read the cache."""
        self.shared.results([p for p in prompts if p.strip()])

    def clear_cache(self) -> None:
        """Forget the cached results (of every scanner sharing the pass)."""
        self.shared.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, threshold={self.threshold})"


def scanner_name(task: str) -> str:
    """The scanner class name of a head: ``injection`` -> ``Injection``, ``prompt_injection`` ->
    ``PromptInjection`` (``scan_prompt`` keys its results by it)."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[_\-]+", task) if part) or task


def _chosen_heads(opened: Any, tasks: Sequence[str] | None) -> list[str]:
    """The heads to make scanners for: ``tasks`` (checked: known, not token heads, not empty,
    none twice), or every classifier head."""
    known = list(opened.tasks)
    problem_of = getattr(opened, "problem", None)
    token = [t for t in known if callable(problem_of) and head_kind(str(problem_of(t))).per_token]
    chosen = list(tasks) if tasks is not None else [t for t in known if t not in token]
    _check_heads("tasks", chosen, known)
    asked = [t for t in chosen if t in token]
    if asked:
        raise GuardmergeError(
            f"head(s) {', '.join(asked)} are token-classification heads (entity spans), not LLM Guard "
            "classifier scanners; serve them with guardmerge serve"
        )
    if not chosen:
        raise GuardmergeError(f"tasks is empty; this model has heads: {', '.join(known)}")
    twice = sorted({t for t in chosen if chosen.count(t) > 1})
    if twice:
        raise GuardmergeError(f"tasks lists head(s) {', '.join(twice)} more than once")
    return chosen


def _check_settings(
    known: list[str], chosen: list[str], limits: Mapping[str, float], benign: Mapping[str, Sequence[str]] | None
) -> None:
    """Thresholds and benign sets name chosen heads; thresholds lie in [0, 1]; no two chosen heads
    share a scanner class name (``scan_prompt`` keys results by it)."""
    _check_heads("thresholds", list(limits), known)
    unused = sorted(set(limits) - set(chosen))
    if unused:
        raise GuardmergeError(
            f"thresholds name head(s) {', '.join(unused)} that tasks leaves out (tasks: {', '.join(chosen)})"
        )
    for task, value in limits.items():
        _check_threshold(task, value)
    _check_heads("benign", list(benign or {}), chosen)
    names: dict[str, str] = {}
    for task in chosen:
        clash = names.setdefault(scanner_name(task), task)
        if clash != task:
            raise GuardmergeError(
                f"heads '{clash}' and '{task}' both give the scanner name '{scanner_name(task)}', and scan_prompt "
                "keys results by name, so one verdict would overwrite the other; pick one with tasks=[...]"
            )


def scanners(
    model_or_folder: Any,
    thresholds: Mapping[str, float] | None = None,
    tasks: Sequence[str] | None = None,
    backend: str = "torch",
    *,
    max_length: int | None = None,
    threads: int | None = None,
    cache_size: int = DEFAULT_CACHE_SIZE,
    batch_size: int = 32,
    benign: Mapping[str, Sequence[str]] | None = None,
) -> list[HeadScanner]:
    """One LLM Guard input scanner per head, all sharing one forward pass per prompt.

    Args:
        model_or_folder: a merged model folder, a folder written by ``guardmerge export-onnx``
            (with ``backend="onnx"``), a loaded :class:`~guardmerge.models.multihead.MultiHeadModel`,
            or a :class:`~guardmerge.serve.backends.Backend`.
        thresholds: head -> threshold in [0, 1]; heads not named get :data:`DEFAULT_THRESHOLD`.
        tasks: the heads to make scanners for, in this order (default: every head).
        backend: ``torch`` or ``onnx`` (a merged folder is then exported to a temporary folder).
        max_length: tokens per prompt (default: the model's limit, at most 512).
        threads: inference threads (default: the runtime's).
        cache_size: prompts whose results are kept.
        batch_size: most prompts per pass in :func:`prefetch`.
        benign: head -> the labels that never flag (default: the head's stored ones, else guessed
            from the names, logged; a single-label head whose benign labels cannot be told is refused).

    Raises:
        GuardmergeError: an unknown head in ``thresholds``, ``tasks`` or ``benign`` (naming it and
            the known ones), a threshold outside [0, 1], heads whose scanner class names collide,
            an unknown backend, a model that cannot be loaded or whose weights hold NaN or Inf.
    """
    if backend not in BACKENDS:
        raise GuardmergeError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    opened, owned = _open(model_or_folder, backend, max_length, threads)
    try:
        chosen = _chosen_heads(opened, tasks)
        limits = dict(thresholds or {})
        _check_settings(list(opened.tasks), chosen, limits, benign)
        bad = list(getattr(opened, "bad_weights", None) or [])
        if bad:
            raise NonFiniteWeightsError(bad)
        shared = SharedPass(
            opened, chosen, cache_size=cache_size, batch_size=batch_size, owns_backend=owned, benign=benign
        )
    except BaseException:
        if owned:
            opened.close()
        raise
    out = []
    for task in chosen:
        cls = cast(type[HeadScanner], type(scanner_name(task), (HeadScanner,), {"__module__": __name__}))
        out.append(cls(task, float(limits.get(task, DEFAULT_THRESHOLD)), shared))
    log.info("LLM Guard scanners for heads %s (%s backend)", ", ".join(chosen), getattr(opened, "name", "?"))
    return out


def prefetch(input_scanners: Sequence[Any], prompts: Sequence[str]) -> None:
    """Run ``prompts`` through the passes of the guardmerge scanners in ``input_scanners`` in
    batches (once per shared pass; other scanners in the list are left alone), so that
    ``scan_prompt`` on each prompt afterwards reads cached results."""
    seen: set[int] = set()
    for scanner in input_scanners:
        if isinstance(scanner, HeadScanner) and id(scanner.shared) not in seen:
            seen.add(id(scanner.shared))
            scanner.prefetch(prompts)


def _open(model_or_folder: Any, backend: str, max_length: int | None, threads: int | None) -> tuple[Backend, bool]:
    """The backend to run, and whether it was opened here (and is closed with the scanners)."""
    if isinstance(model_or_folder, (str, Path)):  # an ONNX folder never imports torch
        return load_backend(model_or_folder, backend, max_length=max_length, threads=threads), True
    from guardmerge.models.multihead import MultiHeadModel

    if isinstance(model_or_folder, MultiHeadModel):
        if backend != "torch":
            raise GuardmergeError(
                f"backend '{backend}' needs a folder (a merged model, or one written by guardmerge export-onnx), "
                "not a loaded model"
            )
        return TorchBackend(model_or_folder, max_length=max_length), False
    if isinstance(model_or_folder, Backend):
        return model_or_folder, False
    raise GuardmergeError(
        f"expected a model folder, a MultiHeadModel or a Backend, got {type(model_or_folder).__name__}"
    )


def _check_heads(what: str, names: Sequence[str], known: Sequence[str]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise GuardmergeError(
            f"{what}: unknown head(s) {', '.join(repr(n) for n in unknown)}; this model has: {', '.join(known)}"
        )


def _check_threshold(task: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise GuardmergeError(f"threshold of head '{task}' must be a number in [0, 1], got {value!r}")
