"""Reading text data: JSONL, CSV and TXT files, and task folders.

A task folder holds ``{train,validation,test}.jsonl`` and ``labels.json`` (``{"labels": [name,
...], "type": ...}``), the layout of ``shared/data``. Its ``type`` sets the record shape:

- ``single_label`` (the default): ``{"text": str, "label": int}``;
- ``multi_label``: ``{"text": str, "labels": [int, ...]}`` (zero or more labels per text);
- ``token``: ``{"tokens": [str, ...], "tags": [int, ...]}``, one tag per word (IOB2). The text a
  model reads is the words joined by single spaces.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardmerge.errors import DataError
from guardmerge.io import read_json
from guardmerge.models.head_kinds import DEFAULT_KIND, KIND_NAMES, KindName

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
MAX_TEXT_CHARS = 100_000  # longer texts are truncated on reading (models see a few hundred tokens)


TaskType = KindName
"""A task's type: the kind of head that learns it (:data:`guardmerge.models.head_kinds.KindName`)."""
TASK_TYPES: tuple[TaskType, ...] = KIND_NAMES


@dataclass(frozen=True)
class Examples:
    """Texts and, for labelled data, one of: ``labels`` (one int per text), ``label_sets``
    (multi-label: a list of ints per text) or ``tags`` (token tasks: one int per word of
    ``words``; ``texts`` are the words joined by spaces)."""

    texts: list[str]
    labels: list[int] | None = None
    label_sets: list[list[int]] | None = None
    words: list[list[str]] | None = None
    tags: list[list[int]] | None = None

    @property
    def kind(self) -> TaskType:
        """The record shape: ``token``, ``multi_label`` or ``single_label``."""
        if self.words is not None:
            return "token"
        return "multi_label" if self.label_sets is not None else "single_label"

    @property
    def labelled(self) -> bool:
        return self.labels is not None or self.label_sets is not None or self.tags is not None

    def head(self, n: int | None) -> Examples:
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None or n >= len(self.texts):
            return self

        def cut(x: list[Any] | None) -> list[Any] | None:
            return None if x is None else x[:n]

        return Examples(self.texts[:n], cut(self.labels), cut(self.label_sets), cut(self.words), cut(self.tags))

    def __len__(self) -> int:
        return len(self.texts)


def read_examples(path: str | Path, *, text_field: str = "text", label_field: str | None = "label") -> Examples:
    """Read ``path`` (``.jsonl``, ``.csv`` or ``.txt``, one text per line).

    Labels are read when ``label_field`` is present in every row; otherwise ``labels`` is None.
    """
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as exc:  # a name too long for the file system
        raise DataError(f"data file '{str(path)[:120]}': {exc.strerror}") from None
    if not found:
        raise DataError(f"data file '{path}' not found")
    suffix = path.suffix.lower()
    where = "line"  # rows are numbered by their line in the file
    try:
        if suffix in (".jsonl", ".json"):
            numbered = _jsonl_rows(path)
        elif suffix in (".csv", ".tsv"):
            where = "row"
            csv.field_size_limit(1 << 30)
            with path.open(newline="", encoding="utf-8") as fh:
                numbered = list(enumerate(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","), 1))
        elif suffix == ".txt":
            with path.open(encoding="utf-8") as fh:
                numbered = [(i, {text_field: line.rstrip("\n")}) for i, line in enumerate(fh, 1) if line.strip()]
        else:
            raise DataError(f"{path}: unsupported data format '{suffix}' (use .jsonl, .csv or .txt)")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (binary file? bad byte at offset {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: invalid CSV: {exc}") from None
    if not numbered:
        raise DataError(f"{path} holds no examples")
    rows = [row for _, row in numbered]
    texts = []
    cut = 0
    for i, row in numbered:
        if text_field not in row:
            raise DataError(f"{path}, row {i}: no field '{text_field}' (fields: {sorted(map(str, row))[:20]})")
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{path}, {where} {i}: field '{text_field}' must be a string, got "
                f"{'null' if text is None else type(text).__name__}"
            )
        if len(text) > MAX_TEXT_CHARS:
            text, cut = text[:MAX_TEXT_CHARS], cut + 1
        texts.append(text)
    if cut:
        log.warning("%s: %d text(s) longer than %d characters were truncated", path, cut, MAX_TEXT_CHARS)
    labels = None
    if label_field and all(label_field in r for r in rows):
        try:
            labels = [_label(r[label_field]) for r in rows]
        except (TypeError, ValueError, OverflowError) as exc:
            raise DataError(f"{path}: field '{label_field}' must hold integer labels: {str(exc)[:100]}") from None
    return Examples(texts, labels)


def _label(value: Any) -> int:
    """An integer label from a JSON/CSV field: an int, an integral float or a digit string of a
    sensible size (a 5,000-digit number or ``1e400`` is refused)."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a label")
    if isinstance(value, str) and len(value.strip()) > 18:
        raise ValueError(f"label '{value[:20]}...' is not a small integer")
    number = int(value) if not isinstance(value, float) else int(value) if value.is_integer() else None
    if number is None or abs(number) > 2**31:
        raise ValueError(f"label {str(value)[:20]} is not a small integer")
    return number


def task_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Unlabelled texts from a data file, or from a task folder's ``train.jsonl`` (the first ``limit``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "train.jsonl"
        if not p.is_file():
            raise DataError(f"{p.parent}: a task folder needs train.jsonl")
    if p.suffix.lower() in (".jsonl", ".json") and _first_row_has(p, "tokens", "text"):
        texts = read_token_examples(p, labelled=False).texts
    else:
        texts = read_examples(p, label_field=None).texts
    return texts[:limit] if limit else texts


def _first_row_has(path: Path, field: str, unless: str) -> bool:
    """Whether the first JSON row of ``path`` has ``field`` and not ``unless`` (a cheap peek)."""
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    return isinstance(row, dict) and field in row and unless not in row
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False  # read_examples reports the problem with its line
    return False


def _int_list(value: object, path: Path, line: int, name: str, size: int) -> list[int]:
    """A JSON list of ints in ``0..size-1``, or a :class:`DataError` naming the line."""
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise DataError(f"{path}, line {line}: field '{name}' must be a list of integers")
    bad = [x for x in value if not 0 <= x < size] if size else []
    if bad:
        raise DataError(f"{path}, line {line}: '{name}' value {bad[0]} outside 0..{size - 1}")
    return list(value)


def read_multi_label_examples(path: str | Path, n_labels: int = 0) -> Examples:
    """``{"text": str, "labels": [int, ...]}`` rows (label indices below ``n_labels`` when given)."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f'{p}: multi-label data must be JSONL ({{"text": ..., "labels": [int, ...]}})')
    ex = read_examples(p, label_field=None)
    sets = [
        _int_list(row.get("labels"), p, i, "labels", n_labels) if "labels" in row else _missing(p, i, "labels")
        for i, row in _jsonl_rows(p)
    ]
    return Examples(ex.texts, label_sets=sets)


def read_token_examples(path: str | Path, n_tags: int = 0, *, labelled: bool = True) -> Examples:
    """``{"tokens": [str, ...], "tags": [int, ...]}`` rows (tags below ``n_tags`` when given);
    the texts are the words joined by single spaces."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file '{p}' not found")
    try:
        numbered = _jsonl_rows(p)
    except UnicodeDecodeError as exc:
        raise DataError(f"{p} is not UTF-8 text (binary file? bad byte at offset {exc.start})") from None
    if not numbered:
        raise DataError(f"{p} holds no examples")
    words, tags = [], []
    for i, row in numbered:
        toks = row.get("tokens")
        if not isinstance(toks, list) or not toks or not all(isinstance(t, str) and t for t in toks):
            raise DataError(f"{p}, line {i}: field 'tokens' must be a non-empty list of non-empty strings")
        if any(any(c.isspace() for c in t) for t in toks):
            raise DataError(f"{p}, line {i}: a token contains whitespace (tokens are words)")
        words.append(toks)
        if labelled:
            if "tags" not in row:
                _missing(p, i, "tags")
            tag = _int_list(row["tags"], p, i, "tags", n_tags)
            if len(tag) != len(toks):
                raise DataError(f"{p}, line {i}: {len(toks)} tokens but {len(tag)} tags")
            tags.append(tag)
    texts = [" ".join(w) for w in words]
    return Examples(texts, words=words, tags=tags if labelled else None)


def _missing(path: Path, line: int, name: str) -> Any:
    raise DataError(f"{path}, line {line}: no field '{name}'")


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:  # JSONDecodeError, and integers beyond Python's digit limit
                raise DataError(f"{path}, line {i}: invalid JSON: {str(exc)[:200]}") from None
            except RecursionError:
                raise DataError(f"{path}, line {i}: invalid JSON: nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {i}: expected a JSON object")
            rows.append((i, row))
    return rows


@dataclass(frozen=True)
class TaskData:
    """A task folder: label names, its type (see the module docstring) and its splits."""

    name: str
    labels: list[str]
    folder: Path
    type: TaskType = DEFAULT_KIND

    def split(self, split: str, limit: int | None = None) -> Examples:
        path = self.folder / f"{split}.jsonl"
        if self.type == "multi_label":
            return read_multi_label_examples(path, len(self.labels)).head(limit)
        if self.type == "token":
            return read_token_examples(path, len(self.labels)).head(limit)
        ex = read_examples(path)
        if ex.labels is None:
            raise DataError(f"{path}: every row needs an integer 'label'")
        bad = [y for y in ex.labels if not 0 <= y < len(self.labels)]
        if bad:
            raise DataError(f"{path}: label {bad[0]} outside 0..{len(self.labels) - 1}")
        return ex.head(limit)

    def has(self, split: str) -> bool:
        return (self.folder / f"{split}.jsonl").is_file()


def load_task(folder: str | Path) -> TaskData:
    """Read a task folder's ``labels.json`` (the task name is the folder name)."""
    folder = Path(folder)
    meta = folder / "labels.json"
    if not meta.is_file():
        raise DataError(f"{meta} not found: a task folder needs labels.json with 'labels'")
    raw = read_json(meta, error=DataError)
    try:
        labels = raw["labels"] if isinstance(raw, dict) else raw
        if isinstance(labels, dict):
            labels = [labels[k] for k in sorted(labels, key=int)]
        labels = [str(x) for x in labels]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f'{meta}: expected {{"labels": [name, ...]}}: {exc}') from None
    if len(labels) < 2:
        raise DataError(f"{meta}: a classifier needs at least 2 labels, found {labels}")
    kind = raw.get("type", DEFAULT_KIND) if isinstance(raw, dict) else DEFAULT_KIND
    if kind not in TASK_TYPES:
        raise DataError(f"{meta}: 'type' must be one of {', '.join(TASK_TYPES)}, got {kind!r}")
    return TaskData(name=folder.name, labels=labels, folder=folder, type=kind)


def discover_tasks(data_dir: str | Path) -> list[str]:
    """Names of the task folders (those with a ``labels.json``) under ``data_dir``."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder '{root}' not found")
    tasks = sorted(p.name for p in root.iterdir() if (p / "labels.json").is_file())
    if not tasks:
        raise DataError(f"no task folders (with labels.json) under '{root}'")
    return tasks
