"""Compatibility checks, run before any merge work, and the resulting merge plan.

Every expert must share the base's architecture, structural config, vocabulary and encoder
tensors (names and shapes), and carry a classification head: a sequence classifier (single- or
multi-label) or a token classifier. A token classifier stores no pooler: an expert that lacks
the base's pooler tensors counts as not having changed them (task vector 0 there); any other
missing encoder tensor is an error. Errors name the expert (by task and path) and the field or
tensor at fault.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from guardmerge.errors import CompatibilityError, ConfigError
from guardmerge.io.formats import TOKENIZER_VOCAB_FILES
from guardmerge.models.adapters import ArchitectureAdapter, HeadLayout, encoder_names
from guardmerge.models.checkpoint import Checkpoint
from guardmerge.models.head_kinds import head_kind

log = logging.getLogger(__name__)

STRUCTURAL_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "hidden_dim",
)
DRIFT_WARN = 0.5  # ||tau|| / ||theta_0|| above this suggests another base
DRIFT_PROBE_NUMEL = 1 << 22  # the drift probe reads matrices up to this size (not the embeddings)


@dataclass(frozen=True)
class MergePlan:
    """What the merge will do, derived from the checkpoints.

    Attributes:
        adapter: the architecture adapter.
        merge_names: float encoder tensors merged by the method, in checkpoint order.
        copy_names: non-float tensors (``position_ids``) copied from the base.
        heads: task -> its head's layout (layers, activation, pooling, norms; the pooler's
            layers first when the base has none, so each head keeps the pooler its expert
            trained). Empty for ``heads: shared``.
        labels: task -> label names.
        shared: ``heads: shared``: head tensors are in ``merge_names`` and the output is one stock
            model under the checkpoint's own names.
        zero_base: merged tensors the base lacks (a headless base's head): theta_0 = 0 for them.
        branch_names: encoder tensors some task keeps from its own expert (the union of
            ``branches``). Empty when every layer is shared.
        share_layers: the sharing depth ``K`` asked for (None: every layer shared), or task ->
            ``K_t`` where the tasks' depths differ.
        branches: task -> the encoder tensors it keeps from its own expert (``K_t < L``): blocks
            ``>= K_t``, the pooler, and at ``K_t = 0`` the embeddings too (those are then also
            merged, for the trunk). A task at ``K_t = L`` has none.
        layers: the number of blocks ``L`` (0 when no sharing depth is set).
        problems: task -> its head kind (``single_label``, ``multi_label``, ``token``).
        absent: task -> the base's pooler tensors its expert lacks (a token classifier): merged
            with a zero task vector, and not part of its branch.
    """

    adapter: ArchitectureAdapter
    merge_names: tuple[str, ...]
    copy_names: tuple[str, ...]
    heads: dict[str, HeadLayout]
    labels: dict[str, tuple[str, ...]]
    shared: bool = False
    zero_base: frozenset[str] = frozenset()
    branch_names: tuple[str, ...] = ()
    share_layers: int | dict[str, int] | None = None
    problems: dict[str, str] = field(default_factory=dict)
    absent: dict[str, frozenset[str]] = field(default_factory=dict)
    branches: dict[str, tuple[str, ...]] = field(default_factory=dict)
    layers: int = 0

    def blocks_per_pass(self) -> int | None:
        """Blocks one forward pass runs: the trunk's ``max K_t`` plus each task's own ``L - K_t``
        (None when no sharing depth is set: ``L``, one pass)."""
        depths = self.depths()
        if not depths:
            return None
        return max(depths.values()) + sum(self.layers - k for k in depths.values())

    def depths(self) -> dict[str, int]:
        """Task -> its sharing depth ``K_t`` (empty when no sharing depth is set)."""
        if self.share_layers is None:
            return {}
        if isinstance(self.share_layers, int):
            return dict.fromkeys(self.heads, self.share_layers)
        return dict(self.share_layers)

    def lacks(self, task: str, name: str) -> bool:
        """Whether ``task``'s expert lacks encoder tensor ``name`` (a pooler it never had)."""
        return name in self.absent.get(task, frozenset())

    def head_tensor_names(self, task: str | None = None) -> list[str]:
        """Canonical head tensor names of ``task`` in the multi-head output (every bias, zeros
        where the stock head has none), or of every task (ordered union: the order in which heads
        are laid out, tensor by tensor)."""
        if task is not None:
            return replace(self.heads[task], no_bias=()).tensor_names() if task in self.heads else []
        out: dict[str, None] = {}
        for t in self.heads:
            out.update(dict.fromkeys(self.head_tensor_names(t)))
        return list(out)


def plan_merge(
    base: Checkpoint,
    experts: Mapping[str, Checkpoint],
    heads_mode: str = "multi",
    share_layers: int | Mapping[str, int] | None = None,
) -> MergePlan:
    """Check that ``experts`` can be merged onto ``base`` and return the plan.

    Args:
        share_layers: sharing depth ``K`` (blocks ``>= K`` and the pooler stay per task), or
            task -> ``K_t`` (every task named).

    Raises:
        CompatibilityError: naming the expert and the field or tensor that differs.
        ConfigError: a sharing depth above the number of layers, or a task without one.
    """
    adapter = base.adapter
    for ck in experts.values():
        _check_config(base, ck)
    if heads_mode == "shared":
        return _plan_shared(base, experts)
    if not adapter.multi_head:
        raise CompatibilityError(
            f"{adapter.model_type} checkpoints cannot become a multi-head model (heads: {heads_mode}); "
            "merge them whole into one stock model with heads: shared"
        )
    base_enc = list(encoder_names(adapter, base.names()))
    pooler_in_base = any(adapter.is_pooler(n) for n in base_enc)
    head_owned_pooler = adapter.has_pooler and not pooler_in_base
    merge_names: list[str] = []
    copy_names: list[str] = []  # integer buffers (position_ids) are copied, never merged
    for name in base_enc:
        (merge_names if base.dtype(name).is_floating_point else copy_names).append(name)
    heads: dict[str, HeadLayout] = {}
    problems: dict[str, str] = {}
    absent: dict[str, frozenset[str]] = {}
    for task, ck in experts.items():
        problems[task] = problem = ck.problem
        heads[task] = adapter.head_layout(ck.config, head_owned_pooler, where=ck.where, problem=problem)
        lacking = _check_tensors(base, merge_names, ck, heads[task])
        if lacking:
            absent[task] = lacking
            log.info("%s has no pooler (a token classifier): merged as unchanged from the base", ck.where)
        _check_labels(ck)
    _check_vocab(base, experts)
    if head_owned_pooler:
        log.info("the base has no pooler: each head keeps its expert's pooler")
    if heads_mode == "hm3":
        _check_hm3(adapter, experts, heads)
    _warn_drift(base, experts, merge_names)
    depths = _depths(share_layers, experts)
    merge_names, branches, layers = _split_branches(adapter, base, merge_names, depths)
    owned = {n for names in branches.values() for n in names}
    uniform = len(set((depths or {}).values())) <= 1
    return MergePlan(
        adapter=adapter,
        merge_names=tuple(merge_names),
        copy_names=tuple(copy_names),
        heads=heads,
        labels={task: tuple(ck.id2label()) for task, ck in experts.items()},
        branch_names=tuple(n for n in base_enc if n in owned),
        share_layers=None if depths is None else next(iter(depths.values())) if uniform else depths,
        problems=problems,
        absent=absent,
        branches=branches,
        layers=layers,
    )


def _depths(share_layers: int | Mapping[str, int] | None, experts: Mapping[str, Checkpoint]) -> dict[str, int] | None:
    """Task -> ``K_t`` from a uniform depth or a per-task mapping (every task named)."""
    if share_layers is None:
        return None
    if isinstance(share_layers, int):
        return dict.fromkeys(experts, share_layers)
    missing = [t for t in experts if t not in share_layers]
    unknown = [t for t in share_layers if t not in experts]
    if missing or unknown:
        raise ConfigError(f"share_layers: no depth for task(s) {missing}, depths for unknown task(s) {unknown}")
    return {t: int(share_layers[t]) for t in experts}


def _split_branches(
    adapter: ArchitectureAdapter, base: Checkpoint, merge_names: Sequence[str], depths: Mapping[str, int] | None
) -> tuple[list[str], dict[str, tuple[str, ...]], int]:
    """``(merged, task -> branch-owned, L)`` names at the sharing depths ``depths`` (task -> ``K_t``).

    A tensor is merged when some task shares it (the trunk runs blocks below ``max K_t``). At
    ``K_t = 0`` the embeddings are both: merged for the trunk (which at least forms the blocks'
    attention arguments) and owned by the task's branch, so it reproduces its expert.
    """
    if depths is None:
        return list(merge_names), {}, 0
    problem = adapter.sharing_problem(base.config)
    if problem:
        raise ConfigError(f"share_layers: {problem} (base {base.source}); leave share_layers unset")
    layers = adapter.num_blocks(merge_names)
    if layers == 0:
        raise ConfigError(f"share_layers: the base ({base.source}) has no {adapter.blocks}.* blocks to branch")
    uniform = len(set(depths.values())) == 1
    for task, depth in depths.items():
        if depth > layers:
            field_name = "share_layers" if uniform else f"share_layers.{task}"
            raise ConfigError(
                f"{field_name} is {depth} but the base ({base.source}) has {layers} layers "
                f"(num_hidden_layers); use 0..{layers}"
            )
    owned = {t: adapter.branch_prefixes(k, layers) for t, k in depths.items()}
    keep = adapter.embeddings + "." if adapter.embeddings else None
    merged = [
        n
        for n in merge_names
        if any(not n.startswith(p) for p in owned.values()) or (keep is not None and n.startswith(keep))
    ]
    branches = {t: tuple(n for n in merge_names if p and n.startswith(p)) for t, p in owned.items()}
    branches = {t: names for t, names in branches.items() if names}
    for task, names in branches.items():
        log.info(
            "share_layers %d of %d: %d tensors of '%s' stay with its expert", depths[task], layers, len(names), task
        )
    return merged, branches, layers


def _plan_shared(base: Checkpoint, experts: Mapping[str, Checkpoint]) -> MergePlan:
    """``heads: shared``: every expert has the same tensors (head included), merged as one."""
    adapter = base.adapter
    first = next(iter(experts.values()))
    heads = [n for n in first.names() if adapter.is_head(n)]
    body = encoder_names(adapter, base.names())
    merge_names = [n for n in body if base.dtype(n).is_floating_point]
    copy_names = [n for n in body if not base.dtype(n).is_floating_point]
    for ck in experts.values():
        _check_tensors_present(base, merge_names, ck, "tensor")
        own = sorted(n for n in ck.names() if adapter.is_head(n))
        if own != sorted(heads):
            raise CompatibilityError(
                f"{ck.where}: heads: shared needs the same head in every expert, but its head tensors are "
                f"{own} and {first.source}'s are {sorted(heads)}; use heads: multi for different label sets"
            )
        for name in heads:
            if ck.shape(name) != first.shape(name):
                raise CompatibilityError(
                    f"{ck.where}: head tensor '{name}' has shape {list(ck.shape(name))} but "
                    f"{first.source}'s has {list(first.shape(name))} (different label sets: use heads: multi)"
                )
        if "id2label" in first.config and ck.config.get("id2label") != first.config.get("id2label"):
            raise CompatibilityError(f"{ck.where}: its labels differ from {first.source}'s; use heads: multi")
    _check_vocab(base, experts)
    for name in heads:
        if name in base and base.shape(name) != first.shape(name):
            raise CompatibilityError(
                f"the base's '{name}' has shape {list(base.shape(name))}, the experts' {list(first.shape(name))}"
            )
    zero = frozenset(n for n in heads if n not in base)
    if zero:
        log.info("the base has no %s: merged against theta_0 = 0 (HM3's all-zero base head)", ", ".join(sorted(zero)))
    _warn_drift(base, experts, merge_names)
    return MergePlan(
        adapter=adapter,
        merge_names=tuple(merge_names + heads),
        copy_names=tuple(copy_names),
        heads={},
        labels={},
        shared=True,
        zero_base=zero,
    )


def _check_tensors_present(
    base: Checkpoint, names: Sequence[str], ck: Checkpoint, what: str = "encoder tensor", allow_pooler: bool = False
) -> frozenset[str]:
    """Check ``ck`` holds every tensor of ``names`` with the base's shape; return the pooler
    tensors it lacks (only with ``allow_pooler``: a token classifier stores no pooler)."""
    lacking = []
    for name in names:
        if name not in ck:
            if allow_pooler and base.adapter.is_pooler(name):
                lacking.append(name)
                continue
            raise CompatibilityError(f"{ck.where} is missing {what} '{name}'")
        if ck.shape(name) != base.shape(name):
            raise CompatibilityError(
                f"{ck.where}: tensor '{name}' has shape {list(ck.shape(name))} but the base "
                f"has {list(base.shape(name))}"
            )
    return frozenset(lacking)


def _check_config(base: Checkpoint, ck: Checkpoint) -> None:
    if ck.model_type != base.model_type:
        raise CompatibilityError(
            f"{ck.where} is a '{ck.model_type}' model but the base ({base.source}) is '{base.model_type}'"
        )
    for key in STRUCTURAL_KEYS:
        a, b = base.config.get(key), ck.config.get(key)
        if a is not None and b is not None and a != b:
            raise CompatibilityError(f"{ck.where}: config field '{key}' is {b} but the base ({base.source}) has {a}")


def _check_tensors(base: Checkpoint, base_enc: Sequence[str], ck: Checkpoint, head: HeadLayout) -> frozenset[str]:
    """Check ``ck``'s encoder and head tensors; return the pooler tensors it lacks."""
    lacking = _check_tensors_present(base, base_enc, ck, allow_pooler=True)
    for name in head.tensor_names():
        if name not in ck:
            token = f" or {ck.adapter.token_classifier_class}" if ck.adapter.token_classifier_class else ""
            raise CompatibilityError(
                f"{ck.where} has no classification head tensor '{name}': guardmerge merges fine-tuned "
                f"*ForSequenceClassification and *ForTokenClassification checkpoints "
                f"({ck.adapter.classifier_class}{token})"
            )
    return lacking


def _check_hm3(adapter: ArchitectureAdapter, experts: Mapping[str, Checkpoint], heads: dict[str, HeadLayout]) -> None:
    """``heads: hm3`` concatenates the experts' single Linear heads on one shared input."""
    for ck in experts.values():
        if head_kind(ck.problem).per_token:
            raise CompatibilityError(
                f"heads: hm3 merges sequence heads on one pooled input, but {ck.where} is a token classifier "
                "(its head reads every token); use heads: multi"
            )
    for task in experts:
        layout = heads[task]
        if len(layout.layers) > 1 or layout.norms or layout.no_bias:
            raise CompatibilityError(
                f"heads: hm3 needs a single Linear head on a shared pooled output, but "
                f"{adapter.model_type} heads here have a hidden layer ({', '.join(layout.layers)}); "
                "use heads: multi"
            )
    first_task, first_ck = next(iter(experts.items()))
    first = heads[first_task]
    for task, ck in list(experts.items())[1:]:
        layout = heads[task]
        if (layout.layers, layout.input) != (first.layers, first.input):
            raise CompatibilityError(
                f"heads: hm3 needs the same head layout in every expert, but {ck.where}'s head reads "
                f"'{layout.input}' ({', '.join(layout.tensor_names())}) and {first_ck.where}'s reads "
                f"'{first.input}' ({', '.join(first.tensor_names())}); use heads: multi"
            )


def _check_labels(ck: Checkpoint) -> None:
    labels = ck.id2label()
    if len(set(labels)) != len(labels):
        raise CompatibilityError(f"{ck.where}: duplicate label names in id2label: {labels}")


def _vocab(ck: Checkpoint) -> dict[str, int] | None:
    if not ck.has_tokenizer():
        return None
    from transformers import AutoTokenizer

    try:
        return dict(AutoTokenizer.from_pretrained(str(ck.path)).get_vocab())
    except Exception as exc:
        raise CompatibilityError(f"cannot load the tokenizer of {ck.source}: {exc}") from None


def _vocab_digest(ck: Checkpoint) -> str | None:
    """A digest of the tokenizer's vocabulary files (None without them): identical files mean
    an identical vocabulary, so the tokenizers need not be loaded."""
    if not ck.has_tokenizer():
        return None
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_VOCAB_FILES:
        f = Path(ck.path) / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest() if found else None


def _check_vocab(base: Checkpoint, experts: Mapping[str, Checkpoint]) -> None:
    digest = _vocab_digest(base)
    if digest is not None and all(_vocab_digest(ck) == digest for ck in experts.values()):
        return  # the same vocabulary files everywhere
    ref_name, ref = base.source, _vocab(base)
    for ck in experts.values():
        vocab = _vocab(ck)
        if vocab is None:
            log.warning("%s has no tokenizer files: vocabulary not checked", ck.where)
            continue
        if ref is None:
            ref_name, ref = ck.source, vocab
            continue
        if vocab != ref:
            only = sorted(set(vocab) ^ set(ref))[:5]
            detail = f"tokens in one but not the other: {only}" if only else "token ids differ"
            raise CompatibilityError(
                f"{ck.where} has a different vocabulary from {ref_name} ({len(vocab)} vs {len(ref)} tokens; {detail})"
            )
    if ref is None:
        log.warning("no tokenizer found in the base or any expert; the output will have none")


def _warn_drift(base: Checkpoint, experts: Mapping[str, Checkpoint], names: Sequence[str]) -> None:
    # four weight matrices, skipping the large embeddings: a cheap probe, not a full pass
    matrices = [n for n in names if len(base.shape(n)) == 2]
    sample = ([n for n in matrices if math.prod(base.shape(n)) <= DRIFT_PROBE_NUMEL] or matrices)[:4]
    for ck in experts.values():
        num = den = 0.0
        for name in sample:
            if name not in ck:  # a pooler a token classifier lacks
                continue
            t0 = base.get(name, torch.float32)
            num += float((ck.get(name, torch.float32) - t0).pow(2).sum())
            den += float(t0.pow(2).sum())
        drift = (num / den) ** 0.5 if den > 0 else 0.0
        if drift > DRIFT_WARN:
            log.warning(
                "%s drifts far from the base (||tau||/||theta_0|| = %.2f on %d tensors): was it fine-tuned from %s?",
                ck.where,
                drift,
                len(sample),
                base.source,
            )
