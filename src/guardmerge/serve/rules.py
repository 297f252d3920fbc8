"""How each head answers and flags, fixed once per server from its settings: :class:`HeadRule`.

A sequence head *flags* a text when any of its non-benign labels has a probability (softmax; a
sigmoid per label for a multi-label head) at or above its threshold (``ServeSettings.thresholds``:
``task`` or ``task.label``, default ``default_threshold``; ``None`` turns flagging off). Benign
labels come from ``ServeSettings.benign``, else the head's stored ones, else a logged guess from
the names that never silences a label (see :mod:`guardmerge.models.benign`); a token head flags a
text that contains an entity of a flagged type (``ServeSettings.flag_entities``, default any
entity). Which rule a head follows is its kind's ``flags`` in the head-kind table
(:mod:`guardmerge.models.head_kinds`). A text is flagged when any of the heads asked for flags it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guardmerge.errors import GuardmergeError
from guardmerge.models.benign import resolve_benign
from guardmerge.models.head_kinds import DEFAULT_KIND, HeadKind, head_kind, kinds_where
from guardmerge.models.outputs import AGGREGATIONS, entity_types
from guardmerge.serve.backends import Backend
from guardmerge.serve.schemas import HEAD_INFOS, HeadInfo
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

    @property
    def kind(self) -> HeadKind:
        """The head kind's entry in the head-kind table."""
        return head_kind(self.problem)


def head_rules(backend: Backend, settings: ServeSettings) -> dict[str, HeadRule]:
    """Every head's :class:`HeadRule`; thresholds, benign labels and entity types that name an
    unknown task, label or type, or a head of the wrong kind, are errors."""
    tasks = backend.tasks
    problem_of = getattr(backend, "problem", None)
    kinds = {t: head_kind(str(problem_of(t)) if callable(problem_of) else DEFAULT_KIND) for t in tasks}
    labels = {t: list(backend.labels(t)) for t in tasks}
    have = ", ".join(tasks)
    for key in settings.thresholds:
        task, _, label = key.partition(".")
        if task not in labels:
            raise GuardmergeError(f"threshold for unknown task(s) {task}; this model has: {have}")
        if label and kinds[task].flags != "labels":
            raise GuardmergeError(f"threshold '{key}': {kinds[task].name} head '{task}' has no per-label thresholds")
        if label and label not in labels[task]:
            raise GuardmergeError(
                f"threshold '{key}': head '{task}' has no label '{label}'; its labels are {', '.join(labels[task])}"
            )
    for option, given, flags in (
        ("--benign", settings.benign, "labels"),
        ("--flag-entities", settings.flag_entities, "entities"),
    ):
        for task in given:
            if task not in labels:
                raise GuardmergeError(f"{option}: unknown task '{task}'; this model has: {have}")
            if kinds[task].flags != flags:
                fits = " and ".join(k.title for k in kinds_where(flags=flags))
                raise GuardmergeError(f"{option} {task}: applies to {fits} heads; '{task}' is {kinds[task].name}")
    if settings.aggregation not in AGGREGATIONS:
        raise GuardmergeError(f"unknown aggregation '{settings.aggregation}'; use one of {', '.join(AGGREGATIONS)}")
    return {t: _rule(t, kinds[t], labels[t], settings, backend) for t in tasks}


def _rule(task: str, kind: HeadKind, names: Sequence[str], settings: ServeSettings, backend: Backend) -> HeadRule:
    """One head's :class:`HeadRule` by its kind's flag rule: entity types (``flags: entities``), or
    per-label thresholds and benign labels (``flags: labels``)."""
    if kind.flags == "entities":
        types = settings.flag_entities.get(task)
        unknown = sorted(set(types or ()) - set(entity_types(names)))
        if unknown:
            raise GuardmergeError(
                f"--flag-entities {task}: unknown entity type(s) {', '.join(unknown)}; "
                f"its types are {', '.join(entity_types(names))}"
            )
        entities = None if types is None else frozenset(types)
        return HeadRule(kind.name, tuple(names), settings.threshold(task), entities=entities)
    stored_of = getattr(backend, "thresholds", None)
    benign_of = getattr(backend, "benign", None)
    stored = stored_of(task) if callable(stored_of) else {}
    cuts = tuple(settings.label_threshold(task, n, stored) for n in names)
    benign: frozenset[str] = frozenset()
    if any(c is not None for c in cuts):  # a head that can flag
        told = (
            settings.benign.get(task) if task in settings.benign else benign_of(task) if callable(benign_of) else None
        )
        how = f"--benign {task}=LABEL[,LABEL...] (or --threshold {task}=off)"
        benign = resolve_benign(task, names, kind.name, told, how)
    return HeadRule(kind.name, tuple(names), settings.threshold(task), cuts, benign)


def head_info(task: str, rule: HeadRule, aggregation: str) -> HeadInfo:
    """What ``GET /v1/model`` shows of one head (the schema of its kind, ``HEAD_INFOS``)."""
    schema = HEAD_INFOS[rule.problem]
    fields = {
        "task": task,
        "labels": list(rule.labels),
        "threshold": rule.threshold,
        "benign": [n for n in rule.labels if n in rule.benign],
        "label_thresholds": dict(zip(rule.labels, rule.label_thresholds)),
        "entity_types": entity_types(rule.labels),
        "flag_entities": None if rule.entities is None else sorted(rule.entities),
        "aggregation": aggregation,
    }
    return schema(**{k: v for k, v in fields.items() if k in schema.model_fields})


def check_tasks(tasks: Sequence[str], settings: ServeSettings) -> None:
    """Refuse thresholds for tasks not in ``tasks`` (naming every one)."""
    unknown = sorted({key.partition(".")[0] for key in settings.thresholds} - set(tasks))
    if unknown:
        raise GuardmergeError(f"threshold for unknown task(s) {', '.join(unknown)}; this model has: {', '.join(tasks)}")
