"""Reading text data: JSONL, CSV and TXT files, and task folders.

A task folder holds ``{train,validation,test}.jsonl`` (``{"text": str, "label": int}`` per
line) and ``labels.json`` (``{"labels": [name, ...]}``), the layout of ``shared/data``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from guardmerge.errors import DataError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Examples:
    """Texts with optional integer labels (``None`` for unlabelled data)."""

    texts: list[str]
    labels: list[int] | None = None

    def head(self, n: int | None) -> Examples:
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None or n >= len(self.texts):
            return self
        return Examples(self.texts[:n], None if self.labels is None else self.labels[:n])

    def __len__(self) -> int:
        return len(self.texts)


def read_examples(
    path: str | Path, *, text_field: str = "text", label_field: str | None = "label"
) -> Examples:
    """Read ``path`` (``.jsonl``, ``.csv`` or ``.txt``, one text per line).

    Labels are read when ``label_field`` is present in every row; otherwise ``labels`` is None.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".txt":
        lines = [l.rstrip("\n") for l in path.open(encoding="utf-8")]
        rows = [{text_field: l} for l in lines if l.strip()]
    else:
        raise DataError(f"{path}: unsupported data format '{suffix}' (use .jsonl, .csv or .txt)")
    if not rows:
        raise DataError(f"{path} holds no examples")
    texts = []
    for i, row in enumerate(rows, 1):
        if text_field not in row:
            raise DataError(f"{path}, row {i}: no field '{text_field}' (fields: {sorted(row)})")
        texts.append(str(row[text_field]))
    labels = None
    if label_field and all(label_field in r for r in rows):
        try:
            labels = [int(r[label_field]) for r in rows]
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: field '{label_field}' must hold integer labels: {exc}") from None
    return Examples(texts, labels)


def task_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Unlabelled texts from a data file, or from a task folder's ``train.jsonl`` (the first ``limit``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "train.jsonl"
        if not p.is_file():
            raise DataError(f"{p.parent}: a task folder needs train.jsonl")
    texts = read_examples(p, label_field=None).texts
    return texts[:limit] if limit else texts


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {i}: invalid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {i}: expected a JSON object")
            rows.append(row)
    return rows


@dataclass(frozen=True)
class TaskData:
    """A task folder: label names and its splits (those present)."""

    name: str
    labels: list[str]
    folder: Path

    def split(self, split: str, limit: int | None = None) -> Examples:
        path = self.folder / f"{split}.jsonl"
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
    try:
        raw = json.loads(meta.read_text())
        labels = raw["labels"] if isinstance(raw, dict) else raw
        if isinstance(labels, dict):
            labels = [labels[k] for k in sorted(labels, key=int)]
        labels = [str(x) for x in labels]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{meta}: expected {{\"labels\": [name, ...]}}: {exc}") from None
    if len(labels) < 2:
        raise DataError(f"{meta}: a classifier needs at least 2 labels, found {labels}")
    return TaskData(name=folder.name, labels=labels, folder=folder)


def discover_tasks(data_dir: str | Path) -> list[str]:
    """Names of the task folders (those with a ``labels.json``) under ``data_dir``."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder '{root}' not found")
    tasks = sorted(p.name for p in root.iterdir() if (p / "labels.json").is_file())
    if not tasks:
        raise DataError(f"no task folders (with labels.json) under '{root}'")
    return tasks
