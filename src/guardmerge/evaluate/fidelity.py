"""Fidelity: how closely each head of a merged model answers like its expert, on unlabelled texts.

A merged head replaces its expert only if it gives the verdicts the expert gave, on the task's
own traffic and on every other task's (a guard sees every prompt). :func:`fidelity` runs the
merged model and each expert over the same texts and reports, per head, in the evaluation
layer's ``{task: {metric: value}}`` shape:

- ``agreement``: the share of texts whose verdict equals the expert's, by the head's kind (its
  ``fidelity`` entry in :data:`~guardmerge.models.head_kinds.HEAD_KINDS`, a function of
  :data:`COMPARISONS`): the argmax (single-label); the set of labels at the head's thresholds
  (multi-label, with ``label_agreement`` over every label and ``agreement/<label>`` per label);
  for token heads the entity-level F1 of the merged head's spans against the expert's (exact
  type and character offsets, as seqeval's strict micro-F1 counts entities; 1.0 when neither
  finds one) and ``token_agreement``, the per-token tag agreement on the non-padding,
  non-special tokens;
- ``flag_rate``, ``expert_flag_rate`` and ``flag_rate_diff`` (merged minus expert): the share of
  texts flagged at the served thresholds, by the server's own rule (:mod:`guardmerge.serve.rules`,
  :func:`guardmerge.serve.verdicts.verdicts`);
- each with a 95% percentile bootstrap interval (``<name>_low``, ``<name>_high``: 1,000 draws
  resampling the texts, seed 0; :mod:`guardmerge.evaluate.bootstrap`);
- the same on the other tasks' texts, prefixed ``off_task_``; ``n`` and ``off_task_n`` count the
  texts.

Both models are judged at the merged head's stored thresholds and benign labels (what it is
served with), and the expert's spans are read with the merged model's tokens (experts share its
tokenizer). No label is ever read: the texts may come from unlabelled files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from tqdm.auto import tqdm

from guardmerge.errors import ConfigError, DataError, GuardmergeError
from guardmerge.evaluate.bootstrap import DRAWS, LEVEL, SEED, Ratio
from guardmerge.io.formats import MERGE_CONFIG_FILE
from guardmerge.models.outputs import TextTokens, entity_spans, label_thresholds, sigmoid, softmax, token_rows

if TYPE_CHECKING:
    from guardmerge.models.multihead import MultiHeadModel
    from guardmerge.serve.backends import TorchBackend
    from guardmerge.serve.rules import HeadRule

log = logging.getLogger(__name__)

__all__ = [
    "COMPARISONS",
    "Compared",
    "Comparison",
    "argmax_agreement",
    "compare_logits",
    "expert_folders",
    "fidelity",
    "fidelity_report",
    "fidelity_table",
    "fidelity_texts",
    "head_logits",
    "label_set_agreement",
    "span_agreement",
]

Results = dict[str, dict[str, float]]
OFF_TASK = "off_task_"
"""The prefix of every statistic measured on the other tasks' texts."""


@dataclass(frozen=True)
class Compared:
    """One head of the merged model and of its expert on the same ``n`` texts.

    Attributes:
        labels: the head's label names in logit order (``C``).
        merged, expert: logits ``[n, C]`` (a token head's: ``[n, T, C]``, padded).
        thresholds: each label's threshold ``[C]`` (multi-label heads).
        texts: the texts (token heads).
        tokens: each text's tokens with character offsets (token heads).
        padding_side: where the tokenizer padded (token heads).
    """

    labels: Sequence[str]
    merged: np.ndarray
    expert: np.ndarray
    thresholds: Sequence[float] = ()
    texts: Sequence[str] = ()
    tokens: Sequence[TextTokens] = ()
    padding_side: str = "right"

    def take(self, idx: np.ndarray) -> Compared:
        """The texts at ``idx`` only."""
        pick = idx.tolist()
        return replace(
            self,
            merged=self.merged[idx],
            expert=self.expert[idx],
            texts=[self.texts[i] for i in pick] if self.texts else (),
            tokens=[self.tokens[i] for i in pick] if self.tokens else (),
        )


Comparison = Callable[[Compared], dict[str, Ratio]]
"""``Compared -> {statistic: Ratio}`` of one head kind (``agreement`` always among them)."""


def _share(same: np.ndarray) -> Ratio:
    """The share of texts where ``same`` ``[n]`` holds."""
    return Ratio(same.astype(np.float64), np.ones(len(same)))


def argmax_agreement(c: Compared) -> dict[str, Ratio]:
    """Single-label heads: ``agreement``, the share of texts with the expert's argmax."""
    return {"agreement": _share(c.merged.argmax(-1) == c.expert.argmax(-1))}


def label_set_agreement(c: Compared) -> dict[str, Ratio]:
    """Multi-label heads, at ``c.thresholds``: ``agreement`` (the same set of labels as the
    expert), ``label_agreement`` (the share of (text, label) decisions that agree) and
    ``agreement/<label>`` per label."""
    cuts = np.asarray(c.thresholds, dtype=np.float64)
    same = (sigmoid(c.merged) >= cuts) == (sigmoid(c.expert) >= cuts)  # [n, C]
    out = {
        "agreement": _share(same.all(axis=-1)),
        "label_agreement": Ratio(same.sum(axis=-1).astype(np.float64), np.full(len(same), float(same.shape[-1]))),
    }
    out.update({f"agreement/{name}": _share(same[:, j]) for j, name in enumerate(c.labels)})
    return out


def _spans(text: str, tok: TextTokens, rows: np.ndarray, labels: Sequence[str]) -> set[tuple[str, int, int]]:
    return {(s["label"], s["start"], s["end"]) for s in entity_spans(text, tok, softmax(rows), labels)}


def span_agreement(c: Compared) -> dict[str, Ratio]:
    """Token heads: ``agreement``, the entity-level F1 of the merged head's spans against the
    expert's (``2 * matching / (merged spans + expert spans)`` over the texts; spans match on
    type and character offsets), and ``token_agreement``, the share of non-padding, non-special
    tokens whose tag (argmax) is the expert's."""
    n = len(c.tokens)
    if n != len(c.merged):
        raise GuardmergeError(f"span agreement needs every text's tokens: {n} for {len(c.merged)} texts")
    matched, spans, same, counted = (np.zeros(n) for _ in range(4))
    for i, (text, tok) in enumerate(zip(c.texts, c.tokens)):
        mine, theirs = (token_rows(x[i], len(tok), c.padding_side) for x in (c.merged, c.expert))
        real = ~np.asarray(tok.special, dtype=bool)
        same[i] = (mine.argmax(-1) == theirs.argmax(-1))[real].sum()
        counted[i] = real.sum()
        a, b = _spans(text, tok, mine, c.labels), _spans(text, tok, theirs, c.labels)
        matched[i], spans[i] = 2 * len(a & b), len(a) + len(b)
    return {"agreement": Ratio(matched, spans), "token_agreement": Ratio(same, counted)}


COMPARISONS: dict[str, Comparison] = {
    "argmax_agreement": argmax_agreement,
    "label_set_agreement": label_set_agreement,
    "span_agreement": span_agreement,
}
"""Comparisons by the name a head kind's table entry gives (``HeadKind.fidelity``)."""


def head_logits(
    model: MultiHeadModel,
    texts: Sequence[str],
    heads: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = 128,
    progress: bool = False,
    desc: str = "fidelity",
) -> dict[str, np.ndarray]:
    """``{head: logits [len(texts), C]}`` (a token head's ``[len(texts), T, C]``) from one pass
    of ``model`` per batch, with a progress bar over the batches when asked."""
    parts: dict[str, list[Any]] = {h: [] for h in heads}
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2):
        chunk = texts[start : start + batch_size]
        for head, values in model.logits(chunk, batch_size=batch_size, max_length=max_length, tasks=heads).items():
            parts[head].append(values)
    return {h: model.concat_logits(h, p).numpy() for h, p in parts.items()}


class _OneHead:
    """One head of a backend, so that the server's :func:`~guardmerge.serve.rules.head_rules`
    resolves (and may refuse) that head alone."""

    def __init__(self, backend: Any, task: str) -> None:
        self.backend = backend
        self.tasks = [task]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


def _flag_rules(
    merged: MultiHeadModel, tasks: Sequence[str], max_length: int | None, benign: Mapping[str, Sequence[str]]
) -> tuple[TorchBackend, dict[str, HeadRule]]:
    """The merged model as the server sees it, and each head's serving rule (stored thresholds
    and benign labels, ``benign`` where given). A head whose benign labels cannot be told gets no
    rule (its flag rates are left out, with a warning); an error in ``benign`` is raised."""
    from guardmerge.serve.backends import Backend, TorchBackend
    from guardmerge.serve.rules import head_rules
    from guardmerge.serve.settings import ServeSettings

    unknown = sorted(set(benign) - set(tasks))
    if unknown:
        raise GuardmergeError(f"--benign: no compared head '{unknown[0]}'; the heads are {', '.join(tasks)}")
    backend = TorchBackend(merged, max_length)
    rules = {}
    for task in tasks:
        settings = ServeSettings(benign={task: list(benign[task])} if task in benign else {})
        try:
            rules[task] = head_rules(cast(Backend, _OneHead(backend, task)), settings)[task]
        except GuardmergeError as exc:
            if task in benign:
                raise
            log.warning("head '%s': no flag rates: %s", task, exc)
    return backend, rules


def _flags(backend: TorchBackend, task: str, rule: HeadRule, texts: Sequence[str], logits: np.ndarray) -> np.ndarray:
    """``[n]`` bool: whether the server flags each text by ``rule`` from these logits."""
    from guardmerge.serve.inference import entity_outputs
    from guardmerge.serve.settings import ServeSettings
    from guardmerge.serve.verdicts import verdicts

    outputs = {task: logits}
    if rule.kind.per_token:  # the server reads a token head's entity spans, not its logits
        outputs = entity_outputs(backend, texts, outputs, {task: rule}, ServeSettings().aggregation)
    return np.array([v.heads[task].flagged for v in verdicts(outputs, {task: rule})], dtype=bool)


def _expert_head(merged: MultiHeadModel, expert: MultiHeadModel, task: str) -> str:
    """The expert's head compared with the merged head ``task`` (named ``task``, or its only
    head), checked to have the same kind and labels."""
    if task not in merged.tasks:
        raise GuardmergeError(
            f"expert '{task}': the merged model has no head '{task}'; its heads: {', '.join(merged.tasks)}"
        )
    head = task if task in expert.tasks else expert.tasks[0] if len(expert.tasks) == 1 else None
    if head is None:
        raise GuardmergeError(f"expert '{task}': no head '{task}' among its heads {', '.join(expert.tasks)}")
    if expert.kind(head).name != merged.kind(task).name or expert.labels(head) != merged.labels(task):
        raise GuardmergeError(
            f"expert '{task}': a {expert.kind(head).title} head with labels {expert.labels(head)}, but the merged "
            f"head '{task}' is {merged.kind(task).title} with labels {merged.labels(task)}"
        )
    return head


def _pool(texts: Mapping[str, Sequence[str]]) -> tuple[list[str], np.ndarray, list[str]]:
    """Every text once, in task order: ``(texts, source [N] (index into names), names)``."""
    names = list(texts)
    pool: list[str] = []
    source: list[int] = []
    for k, name in enumerate(names):
        chunk = list(texts[name])
        if not chunk:
            raise DataError(f"texts of '{name}': none to compare on")
        if not all(isinstance(t, str) for t in chunk):
            raise DataError(f"texts of '{name}': every text must be a string")
        pool += chunk
        source += [k] * len(chunk)
    return pool, np.asarray(source, dtype=np.int64), names


def _summary(ratios: Mapping[str, Ratio], prefix: str, *, draws: int, seed: int, level: float) -> dict[str, float]:
    """``{prefix + name: value, ..._low, ..._high}`` of every ratio."""
    out: dict[str, float] = {}
    for name, ratio in ratios.items():
        out[prefix + name] = ratio.value()
        out[f"{prefix}{name}_low"], out[f"{prefix}{name}_high"] = ratio.interval(draws=draws, seed=seed, level=level)
    return out


def _head_report(
    compare: Comparison,
    whole: Compared,
    flags: tuple[np.ndarray, np.ndarray] | None,
    own: np.ndarray,
    **boot: Any,
) -> dict[str, float]:
    """One head's statistics on its own texts (``own`` ``[N]`` bool) and on the others'."""
    out: dict[str, float] = {}
    for prefix, mask in (("", own), (OFF_TASK, ~own)):
        idx = np.flatnonzero(mask)
        if not len(idx):
            continue
        out[f"{prefix}n"] = float(len(idx))
        ratios = compare(whole.take(idx))
        if flags is not None:
            mine, theirs = (f[idx].astype(np.float64) for f in flags)
            out[f"{prefix}flag_rate"], out[f"{prefix}expert_flag_rate"] = float(mine.mean()), float(theirs.mean())
            ratios["flag_rate_diff"] = Ratio(mine - theirs, np.ones(len(idx)))
        out.update(_summary(ratios, prefix, **boot))
    return out


def fidelity(
    merged: MultiHeadModel,
    experts: Mapping[str, MultiHeadModel],
    texts: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 64,
    max_length: int | None = 128,
    benign: Mapping[str, Sequence[str]] | None = None,
    draws: int = DRAWS,
    seed: int = SEED,
    level: float = LEVEL,
    progress: bool = False,
) -> Results:
    """Each merged head's fidelity to its expert (the module docstring lists the statistics).

    Args:
        merged: the merged model.
        experts: task -> the expert of the merged head ``task`` (a one-head model).
        texts: source -> unlabelled texts; a source named like a head is that head's own
            traffic, every other source its off-task traffic (a source need not be a head).
        benign: head -> its benign labels, for the flag rates (default: the head's stored ones,
            else guessed from the names as the server does).
        draws, seed, level: the bootstrap intervals.
        progress: show a progress bar over each model's batches.

    Returns:
        ``{task: {statistic: value}}`` for every expert's task.
    """
    heads = {task: _expert_head(merged, expert, task) for task, expert in experts.items()}
    pool, _, _ = _pool(texts)

    def run(model: MultiHeadModel, wanted: list[str], desc: str) -> dict[str, np.ndarray]:
        return head_logits(
            model, pool, wanted, batch_size=batch_size, max_length=max_length, progress=progress, desc=desc
        )

    mine = run(merged, list(heads), "fidelity merged")
    theirs = {t: run(experts[t], [h], f"fidelity expert {t}")[h] for t, h in heads.items()}
    return compare_logits(
        merged, texts, mine, theirs, max_length=max_length, benign=benign, draws=draws, seed=seed, level=level
    )


def compare_logits(
    merged: MultiHeadModel,
    texts: Mapping[str, Sequence[str]],
    mine: Mapping[str, np.ndarray],
    theirs: Mapping[str, np.ndarray],
    *,
    max_length: int | None = 128,
    benign: Mapping[str, Sequence[str]] | None = None,
    draws: int = DRAWS,
    seed: int = SEED,
    level: float = LEVEL,
) -> Results:
    """:func:`fidelity` from logits already computed on the pooled ``texts`` (every source's
    texts in order, as :func:`head_logits` gives them): ``mine`` the merged heads', ``theirs``
    each compared task's expert head (so a benchmark or the planner runs each expert once)."""
    pool, source, names = _pool(texts)
    for task in theirs:
        if task not in names:
            log.warning("head '%s': no texts of its own task; only off-task statistics", task)
        for name, logits in ((f"merged head '{task}'", mine.get(task)), (f"expert '{task}'", theirs[task])):
            if logits is None or len(logits) != len(pool):
                raise GuardmergeError(
                    f"{name}: {0 if logits is None else len(logits)} rows of logits, {len(pool)} texts"
                )
    per_token = [t for t in theirs if merged.kind(t).per_token]
    tokens = merged.text_tokens(pool, max_length) if per_token else []
    backend, rules = _flag_rules(merged, list(theirs), max_length, dict(benign or {}))
    results: Results = {}
    for task in theirs:
        labels = merged.labels(task)
        cuts = label_thresholds(labels, merged.spec(task).thresholds)
        whole = Compared(labels, mine[task], theirs[task], cuts, pool, tokens, merged.padding_side)
        flags = None
        if task in rules:
            flags = (
                _flags(backend, task, rules[task], pool, mine[task]),
                _flags(backend, task, rules[task], pool, theirs[task]),
            )
        own = source == (names.index(task) if task in names else -1)
        compare = COMPARISONS[merged.kind(task).fidelity]
        results[task] = _head_report(compare, whole, flags, own, draws=draws, seed=seed, level=level)
    return results


def _cell(res: Mapping[str, float], name: str, signed: bool = False) -> str:
    """``0.925 [0.850, 0.975]`` (``-`` when absent)."""
    if name not in res:
        return "-"
    fmt = "+.3f" if signed else ".3f"
    return f"{res[name]:{fmt}} [{res[name + '_low']:{fmt}}, {res[name + '_high']:{fmt}}]"


def fidelity_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table of :func:`fidelity`'s results: one row per head, own-task and off-task
    agreement and flag-rate difference with their 95% intervals."""
    cols = ("n", "agreement", "flag-rate diff", "off-task n", "off-task agreement", "off-task flag diff")
    rows = []
    for task, res in results.items():
        rows.append(
            (
                task,
                f"{int(res['n'])}" if "n" in res else "-",
                _cell(res, "agreement"),
                _cell(res, "flag_rate_diff", signed=True),
                f"{int(res[OFF_TASK + 'n'])}" if OFF_TASK + "n" in res else "-",
                _cell(res, OFF_TASK + "agreement"),
                _cell(res, OFF_TASK + "flag_rate_diff", signed=True),
            )
        )
    widths = [max(len(r[i]) for r in [("head", *cols), *rows]) for i in range(len(cols) + 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(("head", *cols), widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(
        "agreement: the share of texts with the expert's verdict (the label set at thresholds for "
        "multi-label heads; entity-span F1 for token heads); [95% bootstrap interval]"
    )
    return "\n".join(lines)


# -- the command line's inputs (guardmerge eval MODEL --experts) ----------------------------------


def expert_folders(merged: str | Path, given: Sequence[str] = ()) -> dict[str, str]:
    """Task -> expert folder (or hub id): ``given`` as ``TASK=FOLDER`` items, else every expert
    of the merged folder's ``merge_config.yaml`` (relative paths resolved from that folder).

    Raises:
        ConfigError: an item not ``TASK=FOLDER``, a task given twice, or no ``merge_config.yaml``
            to read when nothing is given.
    """
    from guardmerge.config import load_config, split_assignment

    out: dict[str, str] = {}
    for item in given:
        task, folder = split_assignment(item, "--expert", "TASK=FOLDER")
        if not folder.strip():
            raise ConfigError(f"--expert '{item[:200]}' must look like TASK=FOLDER (no folder given)")
        if task in out:
            raise ConfigError(f"--expert {task}: given twice ({out[task]}, {folder.strip()})")
        out[task] = folder.strip()
    if out:
        return out
    path = Path(merged) / MERGE_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: --experts reads the expert folders from the merged folder's {MERGE_CONFIG_FILE}; "
            "name them with -e TASK=FOLDER"
        )
    return {e.task: e.model for e in load_config(path).experts}


def fidelity_texts(
    data: str | Path | None, given: Sequence[str] = (), split: str = "test", limit: int | None = None
) -> dict[str, list[str]]:
    """Source -> unlabelled texts: the ``split`` file of each task folder under ``data`` (folders
    without one are skipped, with a warning), then each ``TASK=FILE`` of ``given`` (JSONL, CSV or
    TXT; added to the task's texts); labels, where the files hold any, are never read. ``limit``
    caps the texts of each file.

    Raises:
        GuardmergeError: no texts at all; DataError: a file that cannot be read (naming it).
    """
    from guardmerge.config import split_assignment
    from guardmerge.data import discover_tasks, task_texts

    out: dict[str, list[str]] = {}
    for task in discover_tasks(data) if data is not None else []:
        path = Path(data or ".") / task / f"{split}.jsonl"
        if not path.is_file():
            log.warning("task folder '%s' has no %s: not read", path.parent, path.name)
            continue
        out[task] = task_texts(path, limit)
    for item in given:
        task, file = split_assignment(item, "--texts", "TASK=FILE")
        if not file.strip():
            raise ConfigError(f"--texts '{item[:200]}' must look like TASK=FILE (no file given)")
        out[task] = [*out.get(task, []), *task_texts(file.strip(), limit)]
    if not out:
        raise GuardmergeError(
            "a fidelity report needs texts: --data FOLDER (task folders) or --texts TASK=FILE "
            "(unlabelled JSONL/CSV/TXT)"
        )
    return out


def fidelity_report(
    model: str | Path,
    experts: Mapping[str, str],
    texts: Mapping[str, Sequence[str]],
    *,
    task: str | None = None,
    benign: Sequence[str] = (),
    progress: bool = False,
) -> Results:
    """:func:`fidelity` of the model folder ``model`` (a merged folder, or a stock classifier as
    the one-head model ``task``) against the expert folders ``experts`` (task -> folder) on
    ``texts``; ``benign`` holds ``TASK=LABEL,...`` items (``--benign``)."""
    from guardmerge.models.multihead import load_any
    from guardmerge.serve.flags import parse_label_lists

    given = parse_label_lists(list(benign))
    merged = load_any(model, task)
    for name in experts:  # before any expert is loaded
        if name not in merged.tasks:
            raise GuardmergeError(
                f"expert '{name}': the merged model has no head '{name}'; its heads: {', '.join(merged.tasks)}"
            )
    models = {t: load_any(folder, t) for t, folder in experts.items()}
    return fidelity(merged, models, texts, benign=given, progress=progress)
