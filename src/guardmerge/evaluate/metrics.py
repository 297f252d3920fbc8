"""Task metrics: a model and labelled data in, ``{task: {metric: value}}`` out.

Reports and tables are generated from these results, never typed by hand. Metrics come from
scikit-learn (``pip install guardmerge[demo]`` or ``[bench]``) and seqeval (token heads).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from guardmerge.data import Examples
from guardmerge.errors import GuardmergeError
from guardmerge.models.multihead import MultiHeadModel
from guardmerge.models.outputs import OUTSIDE, label_thresholds, token_rows, word_tags

log = logging.getLogger(__name__)

Results = dict[str, dict[str, float]]

OFFICIAL_METRIC: dict[str, tuple[str, str]] = {
    "irony": ("f1_irony", "irony"),  # TweetEval: F1 of the `irony` class
}
"""Tasks whose official metric is not macro-F1: task -> (metric name, positive label)."""


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], task: str | None = None
) -> dict[str, float]:
    """``macro_f1`` and ``accuracy`` (plus the task's official metric where it has one)."""
    try:
        from sklearn.metrics import accuracy_score, f1_score
    except ImportError:
        raise GuardmergeError("evaluation needs scikit-learn: pip install 'guardmerge[demo]'") from None
    idx = list(range(len(labels)))
    out = {
        "macro_f1": float(f1_score(y_true, y_pred, labels=idx, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "n": float(len(y_true)),
    }
    if task in OFFICIAL_METRIC and OFFICIAL_METRIC[task][1] in labels:
        name, positive = OFFICIAL_METRIC[task]
        pos = list(labels).index(positive)
        out[name] = float(f1_score(y_true, y_pred, labels=[pos], average="macro", zero_division=0))
    return out


def multi_label_metrics(
    y_true: Sequence[Sequence[int]],
    y_pred: Sequence[Sequence[int]],
    labels: Sequence[str],
) -> dict[str, float]:
    """Multi-label scores from label sets: ``macro_f1`` (over every label), ``micro_f1``,
    ``exact_match`` and ``f1/<label>`` per label (the predicted sets are the labels over their
    thresholds)."""
    try:
        from sklearn.metrics import f1_score
    except ImportError:
        raise GuardmergeError("evaluation needs scikit-learn: pip install 'guardmerge[demo]'") from None
    n = len(labels)

    def hot(sets: Sequence[Sequence[int]]) -> list[list[int]]:
        return [[int(i in set(s)) for i in range(n)] for s in sets]

    t, p = hot(y_true), hot(y_pred)
    per = f1_score(t, p, average=None, zero_division=0)
    out = {
        "macro_f1": float(f1_score(t, p, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(t, p, average="micro", zero_division=0)),
        "exact_match": float(sum(a == b for a, b in zip(t, p)) / max(1, len(t))),
        "n": float(len(t)),
    }
    out.update({f"f1/{name}": float(v) for name, v in zip(labels, per)})
    return out


def token_metrics(
    y_true: Sequence[Sequence[int]], y_pred: Sequence[Sequence[int]], labels: Sequence[str]
) -> dict[str, float]:
    """Entity-level scores (seqeval, IOB2, strict) from word-level tag indices: ``micro_f1``
    over every entity (the task's official metric), ``macro_f1`` over entity types, and
    ``f1/<type>`` per type."""
    try:
        from seqeval.metrics import classification_report
        from seqeval.scheme import IOB2
    except ImportError:
        raise GuardmergeError("token evaluation needs seqeval: pip install 'guardmerge[demo]'") from None
    gold = [[labels[i] for i in row] for row in y_true]
    pred = [[labels[i] for i in row] for row in y_pred]
    report = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    types = sorted({lab[2:] for lab in labels if lab[:2] in ("B-", "I-")})
    out = {
        "micro_f1": float(report["micro avg"]["f1-score"]),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "n": float(len(gold)),
    }
    out.update({f"f1/{t}": float(report.get(t, {}).get("f1-score", 0.0)) for t in types})
    return out


def evaluate(
    model: MultiHeadModel,
    data: Mapping[str, Examples],
    *,
    batch_size: int = 64,
    max_length: int | None = 128,
    task_map: Mapping[str, str] | None = None,
    progress: bool = False,
) -> Results:
    """Score every head of ``model`` on its task's labelled examples, by the head's kind:

    - single-label: :func:`classification_metrics` of the argmax;
    - multi-label: :func:`multi_label_metrics` of the labels at or above their thresholds (the
      head's own, else 0.5);
    - token: :func:`token_metrics` of word-level tags: each word's tag is the argmax of its first
      sub-token (tokens are mapped to words by their character offsets in the joined text).

    Every result has ``macro_f1``.

    Args:
        data: task -> labelled examples; tasks the model lacks are skipped with a warning.
        task_map: data task -> head name, where they differ (a one-head expert model).
        progress: show a progress bar over each task's batches.
    """
    results: Results = {}
    for task, examples in data.items():
        head = (task_map or {}).get(task, task)
        if head not in model.tasks:
            log.warning("model has no head '%s'; skipped", head)
            continue
        kind = model.kind(head)
        if getattr(examples, kind.gold) is None:  # the data field holding this kind's labels
            if examples.labelled:
                raise GuardmergeError(
                    f"task '{task}': its data are {examples.kind.replace('_', '-')} examples but head '{head}' "
                    f"is a {kind.title} head"
                )
            raise GuardmergeError(f"task '{task}': evaluation needs labelled examples")
        logits = _logits(model, head, examples.texts, batch_size, max_length, progress)
        results[task] = SCORERS[kind.metric](model, head, task, examples, logits, max_length)
    return results


Scorer = Callable[[MultiHeadModel, str, str, Examples, torch.Tensor, int | None], dict[str, float]]
"""``(model, head, task, examples, logits, max_length) -> metrics`` of one head kind."""


def _score_classes(
    model: MultiHeadModel, head: str, task: str, examples: Examples, logits: torch.Tensor, max_length: int | None
) -> dict[str, float]:
    """:func:`classification_metrics` of the argmax."""
    return classification_metrics(examples.labels or [], logits.argmax(-1).tolist(), model.labels(head), task)


def _score_label_sets(
    model: MultiHeadModel, head: str, task: str, examples: Examples, logits: torch.Tensor, max_length: int | None
) -> dict[str, float]:
    """:func:`multi_label_metrics` of the labels whose sigmoid is at or above their thresholds."""
    names = model.labels(head)
    cuts = torch.tensor(label_thresholds(names, model.spec(head).thresholds))
    pred_sets = [torch.nonzero(row).flatten().tolist() for row in torch.sigmoid(logits) >= cuts]
    return multi_label_metrics(examples.label_sets or [], pred_sets, names)


def _score_tags(
    model: MultiHeadModel, head: str, task: str, examples: Examples, logits: torch.Tensor, max_length: int | None
) -> dict[str, float]:
    """:func:`token_metrics` of the word-level tags (:func:`_word_tags`)."""
    pred_tags = _word_tags(model, head, examples, logits, max_length)
    return token_metrics(examples.tags or [], pred_tags, model.labels(head))


SCORERS: dict[str, Scorer] = {
    "classification_metrics": _score_classes,
    "multi_label_metrics": _score_label_sets,
    "token_metrics": _score_tags,
}
"""Scorers by the metric name a head kind's table entry gives (``HeadKind.metric``)."""


def _logits(
    model: MultiHeadModel, head: str, texts: Sequence[str], batch_size: int, max_length: int | None, progress: bool
) -> torch.Tensor:
    """``head``'s logits on ``texts``, batch by batch (with a progress bar when asked)."""
    parts = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=f"eval {head}", unit="batch", disable=not progress or len(starts) < 2):
        chunk = texts[start : start + batch_size]
        parts.append(model.logits(chunk, batch_size=batch_size, max_length=max_length, tasks=[head])[head])
    return model.concat_logits(head, parts)


def _word_tags(
    model: MultiHeadModel, head: str, examples: Examples, logits: torch.Tensor, max_length: int | None
) -> list[list[int]]:
    """Word-level predicted tags: each word's first sub-token's argmax (``O`` for words cut by
    truncation)."""
    names = model.labels(head)
    outside = names.index(OUTSIDE) if OUTSIDE in names else 0
    tokens = model.text_tokens(examples.texts, max_length)
    out = []
    for words, tok, row in zip(examples.words or [], tokens, logits):
        tags = token_rows(row.numpy(), len(tok), model.padding_side).argmax(-1)
        out.append(word_tags(words, tok, tags.tolist(), outside))
    return out


def labelled_report(
    model: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    task: str | None = None,
    limit: int | None = None,
    experts: Sequence[str] = (),
    progress: bool = False,
) -> tuple[Results, str]:
    """``guardmerge eval MODEL --data DATA``: :func:`evaluate` of the model folder ``model`` (a
    stock classifier as the one-head model ``task``) on the ``split`` of every task folder under
    ``data`` that it has a head for, and the results as a :func:`table`. Each ``TASK=FOLDER`` of
    ``experts`` is scored on its task too, and ``normalized`` (merged / expert) added to the task.
    """
    from guardmerge.config import split_assignment
    from guardmerge.data import discover_tasks, load_task
    from guardmerge.models.multihead import load_any

    data = Path(data)
    m = load_any(model, task)
    names = [t for t in discover_tasks(data) if t in m.tasks]
    if not names:
        raise GuardmergeError(f"none of the model's heads ({', '.join(m.tasks)}) has a task folder in {data}")
    examples = {t: load_task(data / t).split(split, limit) for t in names}
    res = evaluate(m, examples, progress=progress)
    rows = {str(model): res}
    if experts:
        pairs = dict(split_assignment(item, "--expert", "TASK=FOLDER") for item in experts)
        ex_res: Results = {}
        for t, folder in pairs.items():
            if t not in examples:
                raise GuardmergeError(f"--expert {t}: no head/task folder '{t}' to compare with")
            ex_res.update(evaluate(load_any(folder, t), {t: examples[t]}, progress=progress))
        for t, value in normalized(res, ex_res).items():
            res[t]["normalized"] = value
        rows["experts"] = ex_res
    return res, table(rows, "macro_f1", names)


def normalized(merged: Results, experts: Results, metric: str = "macro_f1") -> dict[str, float]:
    """Per-task ``merged / expert`` of ``metric`` (tasks in both)."""
    out = {}
    for task, m in merged.items():
        if task in experts and experts[task].get(metric):
            out[task] = m[metric] / experts[task][metric]
    return out


def mean(values: Mapping[str, float] | Sequence[float]) -> float:
    vals = list(values.values()) if isinstance(values, Mapping) else list(values)
    return sum(vals) / len(vals) if vals else float("nan")


def table(rows: Mapping[str, Results], metric: str = "macro_f1", tasks: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per model, one column per task, plus the mean."""
    names = list(tasks or sorted({t for r in rows.values() for t in r}))
    width = max([len(n) for n in rows] + [6])
    head = f"{'model':<{width}}  " + "  ".join(f"{t:>10}" for t in names) + f"  {'mean':>8}"
    lines = [f"{metric}", head, "-" * len(head)]
    for name, res in rows.items():
        vals = [res.get(t, {}).get(metric) for t in names]
        cells = "  ".join(f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in vals)
        present = [v for v in vals if v is not None]
        lines.append(f"{name:<{width}}  {cells}  {mean(present):>8.4f}")
    return "\n".join(lines)


def to_json_ready(results: Mapping[str, Any]) -> dict[str, Any]:
    """Round floats for JSON output."""

    def fix(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 6)
        if isinstance(v, Mapping):
            return {k: fix(x) for k, x in v.items()}
        return v

    return fix(dict(results))
