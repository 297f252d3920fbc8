"""The merge job: a config resolved and validated once, opened once, passed to every stage.

:meth:`MergeJob.of` turns a :class:`~guardmerge.config.MergeConfig` (a pure schema) into a job:
every model path resolved to a local folder (hub ids downloaded), the method and its parameters
validated against the registry, and the plans of the data stages fixed (statistics, layer-wise
solves, head and branch alignment), with every check that needs no weights. Nothing downstream
re-parses, re-resolves or re-validates it.

``with job.open():`` is the session: the base and each expert are opened once
(:class:`~guardmerge.models.checkpoint.Checkpoint`), the merge is planned once
(:func:`~guardmerge.merge.plan.plan_merge`: every compatibility check), and every stage reads the
same open checkpoints: the tensor merge tensor by tensor, the statistics stage and the data
stages through :meth:`MergeJob.stock_model` and :meth:`MergeJob.expert_model` (built once). A
search candidate is the same job with other parameters and weights
(:meth:`MergeJob.with_candidate`), sharing the session.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardmerge.config import AlignConfig, HealConfig, MergeConfig
from guardmerge.errors import ConfigError, GuardmergeError
from guardmerge.io.checkpoint import resolve
from guardmerge.io.formats import read_config
from guardmerge.methods import METHODS, MethodParams, MethodSpec
from guardmerge.models.adapters import ADAPTERS

if TYPE_CHECKING:
    import torch

    from guardmerge.merge.plan import MergePlan
    from guardmerge.models.checkpoint import Checkpoint
    from guardmerge.models.multihead import MultiHeadModel


@dataclass(frozen=True)
class Expert:
    """One expert of a job, as the config names it and where it resolved.

    Attributes:
        task: head name in the merged model.
        source: the model as the config names it (folder or hub id), for provenance.
        folder: the local folder it resolved to.
        weight: per-expert coefficient ``w_i``.
        stats: precomputed statistics file, if given.
        data: unlabelled texts of the task, if given.
    """

    task: str
    source: str
    folder: Path
    weight: float
    stats: str | None = None
    data: str | None = None

    @property
    def where(self) -> str:
        return f"expert '{self.task}' ({self.source})"


@dataclass
class _Session:
    """What an open job holds: its checkpoints, its plan, the models built from them."""

    stack: ExitStack
    base: Checkpoint
    experts: dict[str, Checkpoint]
    plan: MergePlan
    models: dict[str, MultiHeadModel] = field(default_factory=dict)
    depth: int = 0


@dataclass(frozen=True)
class MergeJob:
    """A merge config resolved and validated once; opened once (:meth:`open`) for every stage.

    Attributes:
        config: the config as validated (its ``parameters`` and expert weights match
            :attr:`params` and :attr:`experts`).
        base: the base model's local folder.
        experts: the experts, in config order.
        spec: the registered method; params: its validated parameters.
        statistics: the per-expert statistics the method needs (``gram``, ``fisher``), empty if none.
        alignment: the head-alignment settings, or None when alignment is off.
    """

    config: MergeConfig
    base: Path
    experts: tuple[Expert, ...]
    spec: MethodSpec[Any]
    params: MethodParams
    statistics: frozenset[str]
    alignment: AlignConfig | None
    _session: list[_Session] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def of(cls, config: MergeConfig) -> MergeJob:
        """``config`` resolved and validated into a job.

        Raises:
            ConfigError: an unknown method, invalid parameters, or settings whose inputs are
                missing (statistics without ``stats``/``data``, alignment without ``data``...).
            CheckpointError: a model that cannot be found or fetched.
        """
        spec = METHODS.get(config.method)
        params = spec.validate(config.parameters)
        alignment = _alignment(config)
        _check_sharing(config)
        _check_inputs(config, spec)
        _check_heal(config)
        experts = tuple(Expert(e.task, e.model, resolve(e.model), e.weight, e.stats, e.data) for e in config.experts)
        base = resolve(config.base_model)
        if spec.layerwise is not None:
            _check_layerwise_family(base, config.method)
        return cls(config, base, experts, spec, params, spec.needs, alignment)

    # -- what the job asks for ----------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return [e.task for e in self.experts]

    @property
    def layerwise(self) -> bool:
        """Whether the method runs the layer-wise stage (needs every expert's ``data``)."""
        return self.spec.layerwise is not None

    @property
    def branch_align(self) -> bool:
        return self.config.branch_align

    @property
    def heal(self) -> HealConfig | None:
        """The heal (distillation) settings, or None when the stage is off."""
        return self.config.heal

    @property
    def needs_data(self) -> bool:
        """Whether a stage runs models on the tasks' texts (layer-wise solves, branch alignment,
        heal, head alignment)."""
        return self.layerwise or self.alignment is not None or self.branch_align or self.heal is not None

    def text_count(self) -> int:
        """How many texts per task the data stages read (the largest any of them asks for)."""
        fit = self.alignment or AlignConfig()
        layerwise = self.spec.layerwise.text_count(self.params) if self.spec.layerwise else 0
        counts = [layerwise or 0]
        counts += [self.alignment.examples if self.alignment else 0, fit.examples if self.branch_align else 0]
        counts.append(self.heal.texts if self.heal else 0)
        return max(counts)

    def texts(self, limit: int | None) -> dict[str, list[str]]:
        """Each task's unlabelled texts (the first ``limit``), from its expert's ``data``."""
        from guardmerge.data import task_texts

        missing = [e.task for e in self.experts if not e.data]
        if missing:
            raise ConfigError(f"expert(s) {', '.join(missing)} need `data: FILE` (unlabelled texts of the task)")
        return {e.task: task_texts(e.data, limit) for e in self.experts if e.data}

    def input_paths(self) -> list[str]:
        """Every path the merge reads: what an output must never be, contain or lie inside."""
        return [str(self.base), *[str(p) for e in self.experts for p in (e.folder, e.stats, e.data) if p]]

    def with_candidate(self, parameters: Mapping[str, Any], weights: Sequence[float] | None = None) -> MergeJob:
        """The same job (and open session) with other method parameters (validated) and weights."""
        params = self.spec.validate(parameters)
        experts = self.experts
        if weights is not None:
            if len(weights) != len(experts):
                raise ConfigError(f"{len(weights)} weights for {len(experts)} experts")
            experts = tuple(replace(e, weight=float(w)) for e, w in zip(experts, weights))
        config = self.config.model_copy(
            update={
                "parameters": params.model_dump(),
                "experts": [c.model_copy(update={"weight": e.weight}) for c, e in zip(self.config.experts, experts)],
            }
        )
        return replace(self, config=config, experts=experts, params=params)

    # -- the session ------------------------------------------------------------------------
    @contextmanager
    def open(self, progress: bool = False) -> Iterator[MergeJob]:
        """Open the base and every expert once and plan the merge (every compatibility check);
        re-entrant: an open job stays open until its outermost ``open`` ends."""
        if self._session:
            self._session[0].depth += 1
            try:
                yield self
            finally:
                self._session[0].depth -= 1
            return
        from tqdm.auto import tqdm

        from guardmerge.merge.plan import plan_merge
        from guardmerge.models.checkpoint import Checkpoint

        pickle = self.config.allow_pickle
        with ExitStack() as stack:
            base = stack.enter_context(
                Checkpoint(
                    self.config.base_model,
                    folder=self.base,
                    allow_pickle=pickle,
                    where=f"base model ({self.config.base_model})",
                )
            )
            experts = {}
            for e in tqdm(
                self.experts, desc="open experts", unit="expert", disable=not progress or len(self.experts) < 8
            ):
                experts[e.task] = stack.enter_context(
                    Checkpoint(e.source, folder=e.folder, allow_pickle=pickle, where=e.where)
                )
            plan = plan_merge(base, experts, self.config.heads, self.config.share_depths())
            _check_head_settings(self.config, plan)
            self._session.append(_Session(stack, base, experts, plan))
            try:
                yield self
            finally:
                self._session.clear()

    @property
    def is_open(self) -> bool:
        return bool(self._session)

    def input_abs_max(self) -> float:
        """The largest ``|value|`` of every float tensor the open session has read so far, over
        the base and every expert (see :attr:`CheckpointFiles.abs_max`)."""
        session = self._session[0]
        return max([session.base.files.abs_max, *(ck.files.abs_max for ck in session.experts.values())])

    def _open_session(self) -> _Session:
        if not self._session:
            raise GuardmergeError("the merge job is not open: use `with job.open():`")
        return self._session[0]

    @property
    def plan(self) -> MergePlan:
        return self._open_session().plan

    @property
    def base_checkpoint(self) -> Checkpoint:
        return self._open_session().base

    def checkpoint(self, task: str) -> Checkpoint:
        return self._open_session().experts[task]

    def expert_model(self, task: str) -> MultiHeadModel:
        """``task``'s expert as a one-head model, built once from its open checkpoint (a token
        expert, which has no pooler, gets the base's: the merge counts it as unchanged)."""
        session = self._open_session()
        if task not in session.models:
            from guardmerge.models.multihead import MultiHeadModel

            fill = self.base_tensors(pooler=True)
            session.models[task] = MultiHeadModel.from_classifier(session.experts[task], task, fill=fill)
        return session.models[task]

    def base_tensors(self, *, pooler: bool = False) -> dict[str, torch.Tensor]:
        """The base's encoder tensors under canonical names (a per-block fit's ``theta_0``), or
        with ``pooler`` its pooler's alone (empty without one)."""
        from guardmerge.models.adapters import encoder_names

        ck = self.base_checkpoint
        if pooler:
            return {n: ck.get(n) for n in ck.names() if ck.adapter.is_pooler(n)}
        return {n: ck.get(n) for n in encoder_names(ck.adapter, ck.names())}


# -- validation (everything that needs no weights) ----------------------------------------------


def _alignment(config: MergeConfig) -> AlignConfig | None:
    """The head-alignment settings in force, or None when alignment is off."""
    if config.align_heads is False:
        return None
    if config.heads == "shared":
        if config.align_heads not in (None, False):
            raise ConfigError("align_heads needs a multi-head output; heads: shared writes one stock model")
        return None
    have_data = all(e.data for e in config.experts)
    if config.align_heads is None:
        return AlignConfig() if have_data else None
    if not have_data:
        missing = ", ".join(e.task for e in config.experts if not e.data)
        raise ConfigError(f"align_heads needs unlabelled texts of every task: give `data: FILE` to expert(s) {missing}")
    return AlignConfig() if config.align_heads is True else config.align_heads


def _check_sharing(config: MergeConfig) -> None:
    """``share_layers`` needs ``heads: multi`` (and its mapping form known task names);
    ``branch_align`` needs it and every expert's data."""
    config.share_depths()
    if config.share_layers is not None and config.heads != "multi":
        raise ConfigError(
            f"share_layers gives each task its own upper layers and head: use heads: multi (not heads: {config.heads})"
        )
    if config.branch_align:
        if config.share_layers is None:
            raise ConfigError("branch_align fits the input of each task's own layers: set share_layers")
        missing = [e.task for e in config.experts if not e.data]
        if missing:
            raise ConfigError(
                "branch_align needs unlabelled texts of every task: give `data: FILE` to expert(s) "
                + ", ".join(missing)
            )


def _check_heal(config: MergeConfig) -> None:
    """``heal`` needs a multi-head output, every expert's ``data`` and loss weights of known tasks
    that are not all zero (issue 23 section 2: it fails before anything is written)."""
    heal = config.heal
    if heal is None:
        return
    if config.heads == "shared":
        raise ConfigError("heal trains a multi-head model's heads against their experts: use heads: multi")
    missing = [e.task for e in config.experts if not e.data]
    if missing:
        raise ConfigError(
            "heal distils every expert on a pool of all tasks' unlabelled texts: give `data: FILE` to expert(s) "
            + ", ".join(missing)
        )
    tasks = [e.task for e in config.experts]
    unknown = sorted(set(heal.weights) - set(tasks))
    if unknown:
        raise ConfigError(f"heal.weights: unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(tasks)}")
    if not any(heal.weights.get(t, 1.0) for t in tasks):
        raise ConfigError("heal.weights: every task's loss weight is 0; nothing would be distilled")


def _check_inputs(config: MergeConfig, spec: MethodSpec[Any]) -> None:
    """A method that needs statistics or runs models on texts has what it needs, per expert."""
    lacking = [e.task for e in config.experts if spec.needs and not (e.stats or e.data)]
    if lacking:
        raise ConfigError(
            f"method '{config.method}' needs {', '.join(sorted(spec.needs))} statistics: give "
            f"`stats: FILE` (guardmerge stats) or `data: FILE` to expert(s) {', '.join(lacking)}"
        )
    if spec.layerwise is None:
        return
    if config.heads != "multi":
        raise ConfigError(f"method '{config.method}' solves layers on a multi-head model: use heads: multi")
    without = [e.task for e in config.experts if not e.data]
    if without:
        raise ConfigError(
            f"method '{config.method}' runs the models on each task's texts: give `data: FILE` "
            f"(unlabelled texts) to expert(s) {', '.join(without)}"
        )


def _check_layerwise_family(base: Path, method: str) -> None:
    """Refuse a layer-wise method on a family whose adapter says the stage cannot run on it,
    before any merging (an unreadable or unknown config is left to the checkpoint checks)."""
    try:
        config = read_config(base)
    except GuardmergeError:
        return
    adapter = ADAPTERS.get(str(config.get("model_type", "")))
    problem = adapter.layerwise_problem(config) if adapter is not None else None
    if problem:
        raise ConfigError(f"method '{method}': {problem} (base {base}); use a method without a layer-wise stage")


def _check_head_settings(config: MergeConfig, plan: MergePlan) -> None:
    """Per-label ``thresholds`` and ``benign`` labels of an expert name labels of its head, on a
    sequence head; a sequence head whose benign labels are neither given nor clear from the
    names gets a warning (serving it will need them)."""
    import logging

    from guardmerge.models.benign import resolve_benign
    from guardmerge.models.head_kinds import DEFAULT_KIND, head_kind

    log = logging.getLogger(__name__)
    for e in config.experts:
        kind = "heads: shared" if plan.shared else "a token-classification head"
        token = plan.shared or head_kind(plan.problems.get(e.task, DEFAULT_KIND)).per_token
        for option, value in (("thresholds", e.thresholds), ("benign", e.benign)):
            if value is not None and token:
                raise ConfigError(f"expert '{e.task}': {option} do not apply to {kind}")
        if token:
            continue
        labels = plan.labels[e.task]
        unknown = sorted(set(e.thresholds or {}) - set(labels))
        if unknown:
            raise ConfigError(
                f"expert '{e.task}': thresholds for unknown label(s) {', '.join(unknown)}; "
                f"its labels are {', '.join(labels)}"
            )
        how = f"`benign: [LABEL, ...]` on expert '{e.task}'"
        try:
            resolve_benign(e.task, labels, plan.problems.get(e.task, DEFAULT_KIND), e.benign, how)
        except GuardmergeError as exc:
            if e.benign is not None:
                raise ConfigError(f"expert '{e.task}': {exc}") from None
            log.warning("%s; serving this head will need them", exc)
