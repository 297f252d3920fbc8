"""How each head answers and flags, fixed once per server from its settings: :class:`HeadRule`.

A sequence head *flags* a text when any of its non-benign labels has a probability (softmax; a
sigmoid per label for a multi-label head) at or above its threshold (``ServeSettings.thresholds``:
``task`` or ``task.label``, default ``default_threshold``; ``None`` turns flagging off). Benign
labels come from ``ServeSettings.benign``, else the head's stored ones, else a logged guess from
the names that never silences a label (see :mod:`guardmerge.serve.flags`); a token head flags a
text that contains an entity of a flagged type (``ServeSettings.flag_entities``, default any
entity). A text is flagged when any of the heads asked for flags it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guardmerge.errors import GuardmergeError
from guardmerge.outputs import AGGREGATIONS, entity_types
from guardmerge.serve.backends import Backend
from guardmerge.serve.flags import resolve_benign
from guardmerge.serve.schemas import HeadInfo, MultiLabelHeadInfo, TokenHeadInfo
from guardmerge.serve.settings import ServeSettings

__all__ = ["HeadRule", "check_tasks", "head_info", "head_rules"]


@dataclass(frozen=True)
class HeadRule:
    """How one head answers and flags (built once per server from the settings).

    Attributes:
        problem: ``single_label``, ``multi_label`` or ``token``.
        labels: label names in logit order.
        threshold: the head's threshold (None: it never flags).
        label_thresholds: each label's threshold (sequence heads).
        benign: labels that never flag (sequence heads).
        entities: entity types that flag a text (token heads; None: any).
    """

    problem: str
    labels: tuple[str, ...]
    threshold: float | None
    label_thresholds: tuple[float | None, ...] = ()
    benign: frozenset[str] = frozenset()
    entities: frozenset[str] | None = None


def head_rules(backend: Backend, settings: ServeSettings) -> dict[str, HeadRule]:
    """Every head's :class:`HeadRule`; thresholds, benign labels and entity types that name an
    unknown task, label or type, or a head of the wrong kind, are errors."""
    tasks = backend.tasks
    problem_of = getattr(backend, "problem", None)
    stored_of = getattr(backend, "thresholds", None)
    benign_of = getattr(backend, "benign", None)
    problems = {t: str(problem_of(t)) if callable(problem_of) else "single_label" for t in tasks}
    labels = {t: list(backend.labels(t)) for t in tasks}
    have = ", ".join(tasks)
    for key in settings.thresholds:
        task, _, label = key.partition(".")
        if task not in labels:
            raise GuardmergeError(f"threshold for unknown task(s) {task}; this model has: {have}")
        if label and problems[task] == "token":
            raise GuardmergeError(f"threshold '{key}': token head '{task}' has no per-label thresholds")
        if label and label not in labels[task]:
            raise GuardmergeError(
                f"threshold '{key}': head '{task}' has no label '{label}'; its labels are {', '.join(labels[task])}"
            )
    for option, given, kinds in (
        ("--benign", settings.benign, ("single_label", "multi_label")),
        ("--flag-entities", settings.flag_entities, ("token",)),
    ):
        for task in given:
            if task not in labels:
                raise GuardmergeError(f"{option}: unknown task '{task}'; this model has: {have}")
            if problems[task] not in kinds:
                kind = " and ".join(k.replace("_", "-") for k in kinds)
                raise GuardmergeError(f"{option} {task}: applies to {kind} heads; '{task}' is {problems[task]}")
    if settings.aggregation not in AGGREGATIONS:
        raise GuardmergeError(f"unknown aggregation '{settings.aggregation}'; use one of {', '.join(AGGREGATIONS)}")
    rules = {}
    for t in tasks:
        names = labels[t]
        stored = stored_of(t) if callable(stored_of) else {}
        cuts = tuple(settings.label_threshold(t, n, stored) for n in names)
        benign: frozenset[str] = frozenset()
        if problems[t] != "token" and any(c is not None for c in cuts):  # a head that can flag
            told = settings.benign.get(t) if t in settings.benign else benign_of(t) if callable(benign_of) else None
            how = f"--benign {t}=LABEL[,LABEL...] (or --threshold {t}=off)"
            benign = resolve_benign(t, names, problems[t], told, how)
        if problems[t] == "multi_label":
            rules[t] = HeadRule("multi_label", tuple(names), settings.threshold(t), cuts, benign)
        elif problems[t] == "token":
            types = settings.flag_entities.get(t)
            unknown = sorted(set(types or ()) - set(entity_types(names)))
            if unknown:
                raise GuardmergeError(
                    f"--flag-entities {t}: unknown entity type(s) {', '.join(unknown)}; "
                    f"its types are {', '.join(entity_types(names))}"
                )
            rules[t] = HeadRule(
                "token", tuple(names), settings.threshold(t), entities=None if types is None else frozenset(types)
            )
        else:
            rules[t] = HeadRule("single_label", tuple(names), settings.threshold(t), cuts, benign)
    return rules


def head_info(task: str, rule: HeadRule, aggregation: str) -> HeadInfo:
    """What ``GET /v1/model`` shows of one head."""
    base = {
        "task": task,
        "labels": list(rule.labels),
        "threshold": rule.threshold,
        "benign": [n for n in rule.labels if n in rule.benign],
    }
    if rule.problem == "multi_label":
        return MultiLabelHeadInfo(**base, label_thresholds=dict(zip(rule.labels, rule.label_thresholds)))
    if rule.problem == "token":
        return TokenHeadInfo(
            **base,
            entity_types=entity_types(rule.labels),
            flag_entities=None if rule.entities is None else sorted(rule.entities),
            aggregation=aggregation,
        )
    return HeadInfo(**base)


def check_tasks(tasks: Sequence[str], settings: ServeSettings) -> None:
    """Refuse thresholds for tasks not in ``tasks`` (naming every one)."""
    unknown = sorted({key.partition(".")[0] for key in settings.thresholds} - set(tasks))
    if unknown:
        raise GuardmergeError(f"threshold for unknown task(s) {', '.join(unknown)}; this model has: {', '.join(tasks)}")
