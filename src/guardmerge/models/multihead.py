"""The merged artifact: one shared encoder, one classification head per task.

One encoder pass per batch, then every head; softmax per head (HM3, Hackmann 2024). The folder
format is plain: ``model.safetensors`` (encoder tensors under their canonical names, head
tensors under ``heads.<task>.<layer>.{weight,bias}``), ``config.json`` (the encoder's
transformers config plus a ``guardmerge`` section describing the heads), the tokenizer, the
merge config and a model card. Any single task exports back to a stock
``AutoModelForSequenceClassification`` folder (``AutoModelForTokenClassification`` for a token head).

**Head kinds** (:attr:`HeadSpec.problem`): ``single_label`` (softmax), ``multi_label`` (a sigmoid
per label; labels at or above their thresholds) and ``token`` (per-token logits ``[B, T, C]`` read
from the last hidden states; entity spans in :meth:`MultiHeadModel.predict`). See
:mod:`guardmerge.outputs`.

**Sharing depth** (``share_layers: K`` below the number of blocks ``L``): the encoder is a
*trunk* of the K shared blocks; each task owns a :class:`Branch` (its expert's blocks
``K..L-1``, its pooler where the family has one, and an optional per-feature affine ``align``
applied to the trunk's output first) stored under ``branches.<task>.<canonical name>``
(``branches.hate.encoder.layer.3.attention.self.query.weight``, ``branches.hate.pooler.dense.bias``,
``branches.hate.align.scale`` / ``.shift``); ``config.json`` records ``guardmerge.share_layers``.
The trunk runs once per batch, then each requested task's branch. At ``K = 0`` each branch
also owns its expert's embeddings (``branches.<task>.embeddings.*``) so every task reproduces
its expert exactly; the trunk's (merged) embeddings then only form the blocks' attention
arguments.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from guardmerge.errors import CheckpointError, GuardmergeError, NonFiniteOutputError
from guardmerge.io import atomic_dir
from guardmerge.io.formats import CONFIG_FILE, check_tokenizer_config, clip, read_config
from guardmerge.models.adapters import (
    HEAD_INPUTS,
    MULTI_LABEL_PROBLEM_TYPE,
    PROBLEMS,
    ArchitectureAdapter,
    HeadLayout,
    get_adapter,
)
from guardmerge.outputs import (
    AGGREGATIONS,
    TextTokens,
    entity_spans,
    label_thresholds,
    multi_label_result,
    sigmoid,
    softmax,
    text_tokens,
    token_rows,
)

if TYPE_CHECKING:
    from guardmerge.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)

HEAD_PREFIX = "heads."
BRANCH_PREFIX = "branches."
_BUFFERS = ("position_ids", "token_type_ids")  # non-persistent in recent transformers


@dataclass(frozen=True)
class HeadSpec:
    """How one task's head is built.

    Attributes:
        labels: label names in logit order.
        layers: canonical Linear layer names in order (``classifier``; ``classifier.dense``,
            ``classifier.out_proj``; ``pooler.dense``, ``classifier`` when the head owns a pooler).
        input: ``pooled`` (the encoder's shared pooler output), ``cls`` (first token),
            ``mean`` (masked mean of the tokens) or ``tokens`` (every token: a token head).
        activation: after every layer but the last (``tanh``, ``relu``, ``gelu``...).
        norms: LayerNorms after hidden layers' activations (``norms[i]`` follows layer ``i``).
        norm_eps: the LayerNorms' epsilon.
        problem: ``single_label`` (softmax), ``multi_label`` (a sigmoid per label) or ``token``
            (a softmax per token).
        thresholds: label -> flag threshold of a sequence head's labels (others: 0.5).
        benign: the labels that never flag a text, where someone said so (the expert's
            ``benign:`` in the merge config); None: not given (see :mod:`guardmerge.serve.flags`).

    Every layer and norm of a multi-head model's head carries a bias: where the stock head has
    none (ModernBERT's ``head.dense`` and ``head.norm`` by default) it is stored as zeros, so head
    alignment can fit one; :meth:`MultiHeadModel.export_task` drops a zero bias again.
    """

    labels: tuple[str, ...]
    layers: tuple[str, ...]
    input: str
    activation: str
    norms: tuple[str, ...] = ()
    norm_eps: float = 1e-5
    problem: str = "single_label"
    thresholds: Mapping[str, float] = field(default_factory=dict)
    benign: tuple[str, ...] | None = None

    @classmethod
    def from_layout(
        cls,
        labels: Sequence[str],
        layout: HeadLayout,
        problem: str = "single_label",
        thresholds: Mapping[str, float] | None = None,
        benign: Sequence[str] | None = None,
    ) -> HeadSpec:
        """A spec from the family's :class:`~guardmerge.models.adapters.HeadLayout` and the labels."""
        return cls(
            tuple(labels),
            layout.layers,
            layout.input,
            layout.activation,
            layout.norms,
            layout.norm_eps,
            problem,
            dict(thresholds or {}),
            None if benign is None else tuple(benign),
        )

    @property
    def layout(self) -> HeadLayout:
        """The head's layout as stored here (every bias present)."""
        return HeadLayout(self.layers, self.activation, self.input, self.norms, self.norm_eps)

    def to_dict(self) -> dict[str, Any]:
        """The ``guardmerge.heads.<task>`` entry; optional fields only when set (so a plain head
        is written as before)."""
        out: dict[str, Any] = {
            "labels": list(self.labels),
            "layers": list(self.layers),
            "input": self.input,
            "activation": self.activation,
        }
        if self.norms:
            out["norms"] = list(self.norms)
            out["norm_eps"] = self.norm_eps
        if self.problem != "single_label":
            out["problem"] = self.problem
        if self.thresholds:
            out["thresholds"] = dict(self.thresholds)
        if self.benign is not None:
            out["benign"] = list(self.benign)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadSpec:
        return cls(
            labels=tuple(data["labels"]),
            layers=tuple(data["layers"]),
            input=str(data["input"]),
            activation=str(data["activation"]),
            norms=tuple(data.get("norms") or ()),
            norm_eps=float(data.get("norm_eps", 1e-5)),
            problem=str(data.get("problem", "single_label")),
            thresholds={str(k): float(v) for k, v in (data.get("thresholds") or {}).items()},
            benign=None if data.get("benign") is None else tuple(data["benign"]),
        )

    @property
    def token(self) -> bool:
        """Whether this is a token-classification head (``[B, T, d] -> [B, T, C]``)."""
        return self.problem == "token"


def activation_names() -> list[str]:
    """The activations a head may use (``transformers``' ``ACT2FN`` names)."""
    from transformers.activations import ACT2FN

    return sorted(ACT2FN)


def make_activation(name: str) -> nn.Module:
    """The module of activation ``name``, as the stock classifiers build it."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise GuardmergeError(f"unknown head activation '{name}'; expected one of {', '.join(activation_names())}")
    return cast(nn.Module, ACT2FN[name])


class Head(nn.Module):
    """Linear layers with an activation (and, where the family has one, a LayerNorm) between
    them: ``[B, d] -> [B, C]`` (a token head: ``[B, T, d] -> [B, T, C]``)."""

    def __init__(self, spec: HeadSpec, shapes: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(nn.Linear(i, o) for o, i in shapes)
        self.norms = nn.ModuleList(nn.LayerNorm(shapes[k][0], eps=spec.norm_eps) for k in range(len(spec.norms)))
        self.act = make_activation(spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i:
                x = self.act(x)
                if i - 1 < len(self.norms):
                    x = self.norms[i - 1](x)
            x = layer(x)
        return x

    @property
    def linears(self) -> list[nn.Linear]:
        """The head's Linear layers, in order (``layers`` as typed modules)."""
        return [cast(nn.Linear, m) for m in self.layers]

    def modules_by_name(self) -> dict[str, nn.Module]:
        """Canonical name -> module, for every Linear layer and LayerNorm of the head."""
        out: dict[str, nn.Module] = dict(zip(self.spec.layers, self.layers))
        out.update(zip(self.spec.norms, self.norms))
        return out

    def state(self, task: str) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.spec.layout.tensor_names():
            module, kind = name.rsplit(".", 1)
            out[f"{HEAD_PREFIX}{task}.{name}"] = getattr(self.modules_by_name()[module], kind).detach()
        return out


def stock_head_tensors(task: str, layout: HeadLayout, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``task``'s head tensors under ``heads.<task>.*`` from a stock classifier's ``read(name)``,
    with zeros for the biases its ``layout`` lacks (see :class:`HeadSpec`)."""
    lead = f"{HEAD_PREFIX}{task}."
    out = {lead + name: read(name) for name in layout.tensor_names()}
    for module in (*layout.layers, *layout.norms):
        if module in layout.no_bias:
            weight = out[f"{lead}{module}.weight"]
            out[f"{lead}{module}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return out


def no_init() -> AbstractContextManager[Any]:
    """transformers' ``no_init_weights``: modules are allocated but not initialised (every
    tensor is loaded afterwards, and the loaders refuse a missing one)."""
    from transformers.initialization import no_init_weights

    return cast(AbstractContextManager[Any], no_init_weights())


def build_encoder(config: Mapping[str, Any], with_pooler: bool, *, empty: bool = False) -> nn.Module:
    """A transformers base model (``BertModel``...) for ``config``: randomly initialised, or with
    ``empty`` allocated without initialisation (the caller loads every tensor: fast, no random
    weights are ever computed)."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "guardmerge"})
    with no_init() if empty else nullcontext():
        return AutoModel.from_config(cfg, **get_adapter(cfg.model_type).encoder_kwargs(with_pooler))


def has_pooler(adapter: ArchitectureAdapter, names: Iterable[str]) -> bool:
    """Whether encoder tensors ``names`` (canonical) include the encoder's pooler."""
    return any(adapter.is_pooler(n) for n in names)


def accepted_inputs(encoder: nn.Module) -> frozenset[str]:
    """The tokenizer outputs ``encoder``'s forward names (``token_type_ids`` only where it does)."""
    params = inspect.signature(encoder.forward).parameters
    return frozenset(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params)


def blocks_at(root: nn.Module, path: str) -> nn.ModuleList:
    """The block list ``root.a.b`` for ``path = "a.b"``."""
    return cast(nn.ModuleList, module_at(root, path))


def module_at(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b`` for ``path = "a.b"``."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def first_output(out: Any) -> torch.Tensor:
    """A module's main output: the first element of a tuple output, or the output itself."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _Capture(nn.Module):
    """The branch point: the last entry of a trunk's block list. Returns the hidden states
    unchanged and keeps the call's other arguments (attention mask...) for the branches' blocks,
    so no family's mask format is rebuilt and the whole forward stays traceable. Calls are kept
    per thread, so concurrent forwards on one model do not mix their masks."""

    def __init__(self, tuple_output: bool = False) -> None:
        super().__init__()
        self.calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.tuple_output = tuple_output  # the family's encoder loop unpacks (hidden, attentions)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.calls[threading.get_ident()] = (rest, kwargs)
        return (hidden, None) if self.tuple_output else hidden

    def take(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """This thread's last call arguments (cleared, so no tensors outlive the forward)."""
        call = self.calls.pop(threading.get_ident(), None)
        if call is None:
            raise GuardmergeError("the trunk did not reach its branch point")
        return call


class Affine(nn.Module):
    """Per-feature ``x -> scale * x + shift`` on ``[..., d]`` (``scale``, ``shift``: ``[d]``)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("shift", shift.detach().clone().float())

    scale: torch.Tensor
    shift: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


class Branch(nn.Module):
    """One task's own layers above the shared trunk.

    Args:
        blocks: the expert's blocks ``K..L-1``.
        start: ``K``, the index of the first block.
        adapter: the family's adapter (names).
        pooler: the expert's pooler, or None.
        embeddings: the expert's embeddings (``K = 0`` only: the branch starts from the tokens).
        align: per-feature affine map on the branch input, or None.
        project: the expert's projection of the embeddings to the hidden size (``K = 0`` only,
            a family with ``embeddings_project``), or None.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        start: int,
        adapter: ArchitectureAdapter,
        pooler: nn.Module | None = None,
        embeddings: nn.Module | None = None,
        align: Affine | None = None,
        project: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.start = start
        self.adapter = adapter
        self.pooler = pooler
        self.embeddings = embeddings
        self.align = align
        self.project = project
        self._embedding_inputs = tuple(inspect.signature(embeddings.forward).parameters) if embeddings else ()

    def entry(self, hidden: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The branch input before ``align``: the trunk's hidden states ``[B, T, d]``, or the
        branch's own embeddings of ``inputs`` (``input_ids``...) when it has them."""
        if self.embeddings is None:
            return hidden
        h = self.embeddings(**{k: v for k, v in inputs.items() if k in self._embedding_inputs})
        return self.project(h) if self.project is not None else h

    def forward(
        self,
        hidden: torch.Tensor,
        call: tuple[tuple[Any, ...], dict[str, Any]],
        inputs: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(last hidden states [B, T, d], pooled [B, d] or None)`` from the trunk's output
        ``hidden`` ``[B, T, d]`` and the trunk's block arguments ``call``."""
        args, kwargs = call
        h = self.entry(hidden, inputs)
        if self.align is not None:
            h = self.align(h)
        for block in self.blocks:
            h = first_output(block(h, *args, **kwargs))
        pooled = first_output(self.pooler(h)) if self.pooler is not None else None
        return h, pooled

    def set_align(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Set the per-feature affine map on the branch input (``scale``, ``shift``: ``[d]``)."""
        device = next(self.blocks.parameters()).device if len(self.blocks) else scale.device
        self.align = Affine(scale, shift).to(device)

    def state(self) -> dict[str, torch.Tensor]:
        """The branch's tensors under canonical encoder names (``encoder.layer.3...``,
        ``pooler.dense.weight``, ``embeddings...``) plus ``align.scale`` / ``align.shift``."""
        ad = self.adapter
        out: dict[str, torch.Tensor] = {}
        for name, t in self.blocks.state_dict().items():
            index, rest = name.split(".", 1)
            out[f"{ad.blocks}.{self.start + int(index)}.{rest}"] = t.detach()
        for attr, prefix in (("embeddings", ad.embeddings), ("pooler", ad.pooler), ("project", ad.embeddings_project)):
            module = getattr(self, attr)
            if module is not None and prefix:
                out.update(
                    {f"{prefix}.{n}": t.detach() for n, t in module.state_dict().items() if not n.endswith(_BUFFERS)}
                )
        if self.align is not None:
            out["align.scale"], out["align.shift"] = self.align.scale.detach(), self.align.shift.detach()
        return out


def cut_trunk(encoder: nn.Module, adapter: ArchitectureAdapter, share_layers: int) -> nn.Module:
    """Make ``encoder`` (in place) a trunk: its first ``share_layers`` blocks then the branch
    point, and no pooler (each branch owns one), so its last hidden state is depth K's."""
    problem = adapter.sharing_problem(_config_dict(encoder))
    if problem or adapter.blocks is None:
        raise GuardmergeError(f"share_layers: {problem}")
    blocks = blocks_at(encoder, adapter.blocks)
    parent_path, _, attr = adapter.blocks.rpartition(".")
    parent = module_at(encoder, parent_path) if parent_path else encoder
    setattr(parent, attr, nn.ModuleList([*list(blocks)[:share_layers], _Capture(adapter.block_output_tuple)]))
    if adapter.pooler and getattr(encoder, adapter.pooler, None) is not None:
        setattr(encoder, adapter.pooler, None)
    return encoder


def build_branch(
    trunk: nn.Module,
    adapter: ArchitectureAdapter,
    share_layers: int,
    layers: int,
    tensors: Mapping[str, torch.Tensor],
    where: str,
) -> Branch:
    """A :class:`Branch` from its tensors (canonical names, plus ``align.*``).

    Its modules come from a sibling of ``trunk`` built on the trunk's own config object, so a
    switch of attention implementation (eager for ONNX tracing) reaches the branch too.
    """
    problem = adapter.sharing_problem(_config_dict(trunk))
    if problem or adapter.blocks is None:
        raise GuardmergeError(f"{where}: share_layers: {problem}")
    own = {k: v for k, v in tensors.items() if not k.startswith("align.")}
    with_pooler = bool(adapter.pooler) and any(k.startswith(f"{adapter.pooler}.") for k in own)
    with no_init():  # every owned tensor is loaded below (a missing one is refused)
        donor = type(trunk)(trunk.config, **adapter.encoder_kwargs(with_pooler))
    missing, unexpected = donor.load_state_dict(own, strict=False)
    owned = adapter.branch_prefixes(share_layers, layers)
    missing = [
        m
        for m in missing
        if m.startswith(owned)
        and not m.endswith(_BUFFERS)
        and not (m.startswith(f"{adapter.pooler}.") and not with_pooler)
    ]
    unexpected = [u for u in unexpected if not u.endswith(_BUFFERS)]
    stray = [k for k in own if not k.startswith(owned)]
    if missing or unexpected or stray:
        raise CheckpointError(
            f"{where}: branch tensors do not match share_layers {share_layers} "
            f"(missing {missing[:3]}, unexpected {(list(unexpected) + stray)[:3]})"
        )
    blocks = list(blocks_at(donor, adapter.blocks))[share_layers:]
    pooler = getattr(donor, adapter.pooler) if with_pooler and adapter.pooler else None
    embeddings = module_at(donor, adapter.embeddings) if share_layers == 0 and adapter.embeddings else None
    project = (
        getattr(donor, adapter.embeddings_project, None) if share_layers == 0 and adapter.embeddings_project else None
    )
    align = None
    if "align.scale" in tensors or "align.shift" in tensors:
        if "align.scale" not in tensors or "align.shift" not in tensors:
            raise CheckpointError(f"{where}: 'align.scale' and 'align.shift' come together")
        align = Affine(tensors["align.scale"], tensors["align.shift"])
    return Branch(blocks, share_layers, adapter, pooler, embeddings, align, project)


def _config_dict(encoder: nn.Module) -> dict[str, Any]:
    """``encoder``'s transformers config as a dict (empty without one)."""
    cfg = getattr(encoder, "config", None)
    return cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}


def _load_encoder(encoder: nn.Module, state: Mapping[str, torch.Tensor], strict: bool, where: str) -> None:
    """Load ``state`` into an encoder built without initialisation: a missing tensor is always an
    error (it would hold uninitialised memory); an unexpected one only when ``strict``."""
    missing, unexpected = encoder.load_state_dict(dict(state), strict=False)
    missing = [m for m in missing if not m.endswith(_BUFFERS)]
    unexpected = [u for u in unexpected if not u.endswith(_BUFFERS)] if strict else []
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: encoder tensors do not match the config "
            f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
        )


class MultiHeadModel(nn.Module):
    """A shared encoder with one head per task (and, with a sharing depth, one branch per task).

    Args:
        encoder: a transformers base model (``BertModel``, ``RobertaModel``, ``DistilBertModel``);
            with ``branches``, a trunk made by :func:`cut_trunk`.
        heads: task -> :class:`Head`.
        config: the encoder's config dict (``config.json`` minus the ``guardmerge`` section).
        info: provenance (base, experts, method, parameters, version) for the model card.
        tokenizer: a transformers tokenizer, needed by :meth:`predict`.
        branches: task -> :class:`Branch` (every head needs one), or None: single-pass model.
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, Head],
        config: Mapping[str, Any],
        info: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
        branches: Mapping[str, Branch] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.branches = nn.ModuleDict(dict(branches or {}))
        self.config = dict(config)
        self.info = dict(info or {})
        self.tokenizer = tokenizer
        self.adapter: ArchitectureAdapter = get_adapter(str(self.config["model_type"]))
        self.inputs = accepted_inputs(encoder)
        if self.branches:
            if self._branch_point() is None:
                raise GuardmergeError("a model with branches needs a trunk cut at the branch point (cut_trunk)")
            lacking = [t for t in self.heads if t not in self.branches]
            extra = [t for t in self.branches if t not in self.heads]
            if lacking or extra:
                raise GuardmergeError(
                    f"every head needs one branch: heads without a branch {lacking}, branches without a head {extra}"
                )
            self.info["share_layers"] = self.share_layers
        self.eval()

    # -- structure -----------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def labels(self, task: str) -> list[str]:
        return list(self._head(task).spec.labels)

    def _head(self, task: str) -> Head:
        if task not in self.heads:
            raise GuardmergeError(f"unknown task '{task}'; this model has: {', '.join(self.tasks)}")
        return self.heads[task]  # type: ignore[return-value]

    def _branch_point(self) -> _Capture | None:
        if self.adapter.blocks is None:
            return None
        blocks = blocks_at(self.encoder, self.adapter.blocks)
        last = blocks[-1] if len(blocks) else None
        return last if isinstance(last, _Capture) else None

    @property
    def share_layers(self) -> int | None:
        """The sharing depth K of a branched model (None: every layer shared, one pass)."""
        if not self.branches:
            return None
        return len(blocks_at(self.encoder, self.adapter.blocks or "")) - 1

    def branch(self, task: str) -> Branch:
        """``task``'s :class:`Branch` (a branched model only)."""
        self._head(task)
        if task not in self.branches:
            raise GuardmergeError(f"this model has no branches (share_layers unset): task '{task}' has none")
        return self.branches[task]  # type: ignore[return-value]

    # -- inference -----------------------------------------------------------------------
    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tasks: Sequence[str] | None = None,
        **extra: torch.Tensor,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{task: {"cls": [B, d], "pooled": [B, d]}}``: the encoder (trunk) runs once, then
        each task's branch on the trunk's output when the model has branches."""
        chosen = list(tasks) if tasks is not None else self.tasks
        extra = self._extra(extra)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        if not self.branches:
            shared = _feats(out[0], getattr(out, "pooler_output", None), self._mean_mask(attention_mask))
            return dict.fromkeys(chosen, shared)
        point = self._branch_point()
        assert point is not None
        call = point.take()
        inputs = {"input_ids": input_ids, **extra}
        feats = {}
        for t in chosen:
            hidden, pooled = self.branch(t)(out[0], call, inputs)
            feats[t] = _feats(hidden, pooled, self._mean_mask(attention_mask))
        return feats

    def _mean_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask for ``"mean"`` pooling when a head reads it (None: no head does)."""
        if not any(h.spec.input == "mean" for h in self.heads.values()):  # type: ignore[union-attr]
            return None
        if attention_mask is None:
            raise GuardmergeError("mean pooling needs the attention mask")
        return attention_mask

    def _extra(self, extra: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The extra tokenizer outputs the encoder takes (``token_type_ids`` where it does)."""
        return {k: v for k, v in extra.items() if k in self.inputs}

    def head_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None, **extra: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Run the encoder once: ``{"pooled": [B, d], "cls": [B, d]}`` (what heads read).

        A branched model's features are per task: ``task`` names whose (required there).
        """
        if not self.branches:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **self._extra(extra))
            return _feats(out[0], getattr(out, "pooler_output", None), self._mean_mask(attention_mask))
        if task is None:
            raise GuardmergeError(f"this model branches at layer {self.share_layers}: head_inputs needs the task")
        return self.features(input_ids, attention_mask, [task], **extra)[task]

    def branch_input(
        self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor
    ) -> torch.Tensor:
        """``[B, T, d]``: what ``task``'s branch reads before its ``align`` (the trunk's output at
        depth K, or the branch's own embeddings at K = 0)."""
        branch = self.branch(task)
        extra = self._extra(extra)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        point = self._branch_point()
        assert point is not None
        point.take()
        return branch.entry(out[0], {"input_ids": input_ids, **extra})

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tasks: Sequence[str] | None = None,
        **extra: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``{task: logits [B, C_task]}`` (a token head: ``[B, T, C_task]``) from one encoder
        (trunk) pass, then each task's branch."""
        chosen = list(tasks) if tasks is not None else self.tasks
        heads = {t: self._head(t) for t in chosen}
        feats = self.features(input_ids, attention_mask, chosen, **extra)
        return {t: heads[t](feats[t][heads[t].spec.input]) for t in chosen}

    def spec(self, task: str) -> HeadSpec:
        """``task``'s :class:`HeadSpec` (labels, layers, kind, thresholds)."""
        return self._head(task).spec

    def problem(self, task: str) -> str:
        """``task``'s head kind: ``single_label``, ``multi_label`` or ``token``."""
        return self.spec(task).problem

    def token_length(self, max_length: int | None = None) -> int:
        """Tokens per text that :meth:`encode` keeps (``max_length``, default 512, capped at the
        model's positions)."""
        from guardmerge.models.adapters import capped_length

        return capped_length(max_length or 512, self.config, "encode", level=logging.DEBUG)

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenise ``texts`` with the model's tokenizer (padded batch tensors)."""
        if self.tokenizer is None:
            raise GuardmergeError("this model has no tokenizer; load it from a saved folder")
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.token_length(max_length),
            return_tensors="pt",
        )
        return {k: v for k, v in batch.items() if k in self.inputs}

    def text_tokens(self, texts: Sequence[str], max_length: int | None = None) -> list[TextTokens]:
        """Each text's tokens as :meth:`encode` makes them, with character offsets (a fast
        tokenizer is needed): what turns a token head's rows into entity spans."""
        return text_tokens(self.tokenizer, texts, self.token_length(max_length))

    @property
    def padding_side(self) -> str:
        """Where the tokenizer pads a batch (``right`` for encoders)."""
        return str(getattr(self.tokenizer, "padding_side", "right") or "right")

    @torch.no_grad()
    def logits(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        tasks: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{task: logits [len(texts), C_task]}``, input order kept; a token head's are
        ``[len(texts), T, C_task]``, padded to the longest text (on the tokenizer's padding side)
        with zeros.

        Raises:
            NonFiniteOutputError: a head's scores for a text are NaN or infinite (no verdict).
        """
        chosen = list(tasks) if tasks is not None else self.tasks
        parts: dict[str, list[torch.Tensor]] = {t: [] for t in chosen}
        for start in range(0, len(texts), batch_size):
            batch = self.encode(texts[start : start + batch_size], max_length)
            for task, out in self(tasks=chosen, **batch).items():
                parts[task].append(out.float())
        logits = {t: self.concat_logits(t, p) for t, p in parts.items()}
        for task, values in logits.items():  # a guard fails closed: no verdict from NaN or infinity
            bad = (~torch.isfinite(values.reshape(len(values), -1))).any(dim=-1).nonzero()
            if len(bad):
                raise NonFiniteOutputError(
                    f"head '{task}' produced NaN or infinite scores for text {int(bad[0])} "
                    f"({len(bad)} of {len(values)} texts); no verdict is given"
                )
        return logits

    def concat_logits(self, task: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``task``'s batches of logits as one tensor (a token head's padded, on the tokenizer's
        padding side, to the longest batch with zeros)."""
        classes = len(self.labels(task))
        if not self._head(task).spec.token:
            return torch.cat(list(parts)) if parts else torch.empty(0, classes)
        if not parts:
            return torch.empty(0, 0, classes)
        width = max(p.shape[1] for p in parts)
        left = self.padding_side == "left"
        padded = []
        for p in parts:
            gap = width - p.shape[1]
            padded.append(torch.nn.functional.pad(p, (0, 0, gap, 0) if left else (0, 0, 0, gap)))
        return torch.cat(padded)

    def predict(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        tasks: Sequence[str] | None = None,
        thresholds: Mapping[str, float | Mapping[str, float]] | None = None,
        aggregation: str = "first",
    ) -> dict[str, list[Any]]:
        """Every head's answer, per text in input order:

        - single-label heads: ``{"label": str, "score": float}`` (the softmax probability);
        - multi-label heads: ``{"labels": [names at or above their thresholds], "probabilities":
          {name: sigmoid probability}}``;
        - token heads: the text's entity spans ``[{"label": entity type, "start": int, "end": int,
          "text": str, "score": float}]`` (character offsets into the text).

        Args:
            thresholds: task -> one threshold for every label, or label -> threshold, of a
                multi-label head (default: the head's own thresholds, else 0.5).
            aggregation: how a token head's word pieces become entities: ``first`` (each word
                takes its first piece's label) or ``simple`` (each piece its own), as in
                transformers' token-classification pipeline.
        """
        if isinstance(texts, str):
            texts = [texts]
        if aggregation not in AGGREGATIONS:
            raise GuardmergeError(f"unknown aggregation '{aggregation}'; use one of {', '.join(AGGREGATIONS)}")
        chosen = list(tasks) if tasks is not None else self.tasks
        given = dict(thresholds or {})
        for task in given:
            if self.problem(task) != "multi_label":
                raise GuardmergeError(f"thresholds apply to multi-label heads; '{task}' is {self.problem(task)}")
        cuts = {t: label_thresholds(self.labels(t), self._head(t).spec.thresholds, given.get(t)) for t in chosen}
        tokens = (
            self.text_tokens(texts, max_length) if any(self._head(t).spec.token for t in chosen) else []
        )  # before the pass: a slow tokenizer is refused at once
        out: dict[str, list[Any]] = {}
        for task, logit in self.logits(texts, batch_size=batch_size, max_length=max_length, tasks=chosen).items():
            names = self.labels(task)
            problem = self.problem(task)
            if problem == "multi_label":
                probs = sigmoid(logit.numpy())
                out[task] = [multi_label_result(p, names, cuts[task]) for p in probs]
            elif problem == "token":
                rows = logit.numpy()
                out[task] = [
                    entity_spans(text, tok, softmax(token_rows(row, len(tok), self.padding_side)), names, aggregation)
                    for text, tok, row in zip(texts, tokens, rows)
                ]
            else:
                score, idx = torch.softmax(logit, dim=-1).max(dim=-1)
                out[task] = [{"label": names[i], "score": float(s)} for i, s in zip(idx.tolist(), score.tolist())]
        return out

    # -- persistence ---------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as saved: canonical encoder names, then ``heads.<task>.<layer>.*``, then
        ``branches.<task>.<canonical name>`` (a branched model)."""
        tensors = {k: v.detach() for k, v in self.encoder.state_dict().items()}
        for task in self.tasks:
            tensors.update(self._head(task).state(task))
        for task in self.branches:
            tensors.update({f"{BRANCH_PREFIX}{task}.{n}": v for n, v in self.branch(task).state().items()})
        return tensors

    def save_pretrained(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the model folder atomically (temporary folder, then rename)."""
        with atomic_dir(path, force=force) as tmp:
            cfg = folder_config(self.config, {t: self._head(t).spec for t in self.tasks}, self.info)
            write_model_folder(tmp, self.state_tensors(), cfg, self.tokenizer)
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu") -> MultiHeadModel:
        """Load a folder written by :meth:`save_pretrained` or ``guardmerge merge``."""
        from guardmerge.io.checkpoint import CheckpointFiles

        folder = Path(path)
        cfg_file = folder / CONFIG_FILE
        config = read_config(folder)
        meta = config.pop("guardmerge", None)
        if not isinstance(meta, dict) or "heads" not in meta:
            raise CheckpointError(
                f"{cfg_file} has no 'guardmerge.heads' section: this is not a merged multi-head "
                "model (a single classifier loads with transformers directly)"
            )
        specs = head_specs(meta["heads"], cfg_file)
        with CheckpointFiles(folder, config=config) as files:  # every file, dtype and NaN rule
            layout = {k: (files.dtype(k), files.shape(k)) for k in files.stored_names()}
            check_config_shapes(config, layout, folder)  # before any encoder is allocated
            tensors = files.state_dict()
        info = {k: v for k, v in meta.items() if k not in ("heads", "version")}
        model = cls.from_tensors(config, specs, tensors, info, load_tokenizer(folder), where=str(folder))
        return model.to(device)

    @classmethod
    def from_tensors(
        cls,
        config: Mapping[str, Any],
        heads: Mapping[str, HeadSpec],
        tensors: Mapping[str, torch.Tensor],
        info: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
        *,
        strict: bool = True,
        where: str = "tensors",
    ) -> MultiHeadModel:
        """A model from its saved tensors (encoder, ``heads.*``, ``branches.*``).

        ``branches.*`` tensors make a branched model at depth ``info["share_layers"]``;
        ``strict`` checks that the encoder tensors match the config (named after ``where``).
        """
        info = dict(info or {})
        head_mods = {task: head_from_tensors(task, spec, tensors) for task, spec in heads.items()}
        enc_state = {k: v for k, v in tensors.items() if not k.startswith((HEAD_PREFIX, BRANCH_PREFIX))}
        adapter = get_adapter(str(config["model_type"]))
        encoder = build_encoder(config, has_pooler(adapter, enc_state), empty=True)
        branched = any(k.startswith(BRANCH_PREFIX) for k in tensors)
        depth = info.get("share_layers")
        layers = len(blocks_at(encoder, adapter.blocks)) if adapter.blocks else 0
        if branched:
            if not isinstance(depth, int) or not 0 <= depth < layers:
                raise CheckpointError(
                    f"{where}: branch tensors ('{BRANCH_PREFIX}*') need guardmerge.share_layers "
                    f"in 0..{layers - 1}, got {depth!r}"
                )
            cut_trunk(encoder, adapter, depth)
            if depth == 0 and adapter.embeddings_project:  # each branch owns it; the trunk's output is unused
                lead = adapter.embeddings_project + "."
                own = encoder.state_dict()
                enc_state.update({k: torch.zeros_like(v) for k, v in own.items() if k.startswith(lead)})
        _load_encoder(encoder, enc_state, strict, where)
        branches: dict[str, Branch] = {}
        if branched:
            assert isinstance(depth, int)
            for task in heads:
                lead = f"{BRANCH_PREFIX}{task}."
                own = {k[len(lead) :]: v for k, v in tensors.items() if k.startswith(lead)}
                if not own:
                    raise CheckpointError(f"{where}: head '{task}' has no branch tensors ('{lead}*')")
                branches[task] = build_branch(encoder, adapter, depth, layers, own, f"{where}, branch '{task}'")
            stray = sorted(
                {k[len(BRANCH_PREFIX) :].split(".", 1)[0] for k in tensors if k.startswith(BRANCH_PREFIX)} - set(heads)
            )
            if stray:
                raise CheckpointError(f"{where}: branch tensors of tasks without a head: {', '.join(stray)}")
        return cls(encoder, head_mods, config, info=info, tokenizer=tokenizer, branches=branches)

    @classmethod
    def from_classifier(
        cls,
        path: str | Path | Checkpoint,
        task: str | None = None,
        *,
        allow_pickle: bool = False,
        fill: Mapping[str, torch.Tensor] | None = None,
    ) -> MultiHeadModel:
        """Wrap a stock ``*ForSequenceClassification`` (single- or multi-label) or
        ``*ForTokenClassification`` folder (or hub id, or a merge job's open checkpoint, read
        again and not reopened) as a one-head model.

        Args:
            fill: encoder tensors (canonical names) to use where the checkpoint has none: the
                base's pooler for a token classifier, which stores none (the merge counts it as
                unchanged), so the layer-wise stage can fit the merged pooler to it.
        """
        from guardmerge.models.adapters import encoder_names
        from guardmerge.models.checkpoint import Checkpoint

        opened = None if isinstance(path, Checkpoint) else Checkpoint(path, allow_pickle=allow_pickle)
        with opened or nullcontext(path) as ck:
            assert isinstance(ck, Checkpoint)
            ad = ck.adapter
            names = encoder_names(ad, ck.names())
            enc_state = {n: ck.get(n) for n in names}
            for n, t in (fill or {}).items():
                enc_state.setdefault(n, t)
            name = task or Path(ck.source).name
            problem = ck.problem
            layout = ad.head_layout(ck.config, where=ck.source, problem=problem)
            spec = HeadSpec.from_layout(ck.id2label(), layout, problem)
            missing = [n for n in layout.tensor_names() if n not in ck]
            if missing:
                raise CheckpointError(
                    f"{ck.source} has no classification head ('{missing[0]}' missing; "
                    f"expected a {ad.stock_class(problem)})"
                )
            head = head_from_tensors(name, spec, stock_head_tensors(name, layout, ck.get))
            dropped = ("id2label", "label2id", "architectures", "problem_type")
            config = {k: v for k, v in ck.config.items() if k not in dropped}
            encoder = build_encoder(config, has_pooler(ad, enc_state), empty=True)
            _load_encoder(encoder, enc_state, True, ck.where)
            return cls(encoder, {name: head}, config, info={"source": ck.source}, tokenizer=load_tokenizer(ck.path))

    # -- single-task export ----------------------------------------------------------------
    def export_task(self, task: str, path: str | Path, *, force: bool = False) -> Path:
        """Write ``task`` as a stock ``AutoModelForSequenceClassification`` folder (with
        ``problem_type: multi_label_classification`` for a multi-label head), or an
        ``AutoModelForTokenClassification`` folder (without the encoder's pooler) for a token head."""
        head = self._head(task)
        spec = head.spec
        ad = self.adapter
        tensors = {ad.prefixed(k): v for k, v in self.encoder.state_dict().items()}
        if self.branches:  # layers < K from the trunk, the rest (and the pooler) from the branch
            tensors.update(self._branch_export(task))
        # a head that owns its pooler (base checkpoint without one) gives the stock pooler
        head_state = {k[len(f"{HEAD_PREFIX}{task}.") :]: v for k, v in head.state(task).items()}
        biased = self._stock_biases(task, head_state)
        for name, t in head_state.items():
            tensors[ad.prefixed(name)] = t
        tensors = {
            k: v
            for k, v in tensors.items()
            if not k.endswith("position_ids") and not (spec.token and ad.is_pooler(ad.canonical(k)))
        }
        cfg = dict(self.config)
        labels = list(spec.labels)
        cfg.update(ad.head_config(spec.layout, biased))
        cfg.update(
            architectures=[ad.stock_class(spec.problem)],
            id2label={str(i): n for i, n in enumerate(labels)},
            label2id={n: i for i, n in enumerate(labels)},
            num_labels=len(labels),
        )
        cfg.pop("problem_type", None)
        if spec.problem == "multi_label":
            cfg["problem_type"] = MULTI_LABEL_PROBLEM_TYPE
        cfg.pop("guardmerge", None)
        with atomic_dir(path, force=force) as tmp:
            write_model_folder(tmp, tensors, cfg, self.tokenizer)
        return Path(path)

    def _stock_biases(self, task: str, head_state: dict[str, torch.Tensor]) -> list[str]:
        """Drop (in place) the zero biases of ``task``'s head that its stock head lacks; return the
        head layers that keep a bias the stock config must switch on (a bias fitted by head
        alignment where the stock head has none)."""
        spec = self._head(task).spec
        # the biases the stock config leaves out
        stock = self.adapter.head_layout(self.config, problem=spec.problem).no_bias
        switchable = {layer for layer, _ in self.adapter.head_bias_keys}
        biased = []
        for module in (*spec.layers, *spec.norms):
            if module not in stock:
                continue
            if not bool(head_state[f"{module}.bias"].any()):
                del head_state[f"{module}.bias"]
            elif module in switchable:
                biased.append(module)
            else:
                raise GuardmergeError(
                    f"task '{task}': '{module}' has a non-zero bias, which a stock "
                    f"{self.adapter.stock_class(spec.problem)} with this config cannot hold"
                )
        return biased

    def _branch_export(self, task: str) -> dict[str, torch.Tensor]:
        """``task``'s branch under stock names, its ``align`` folded into the LayerNorm that
        produces the branch input (block K-1's output norm, or the embeddings norm at K = 0)."""
        ad, branch = self.adapter, self.branch(task)
        state = branch.state()
        scale, shift = state.pop("align.scale", None), state.pop("align.shift", None)
        out = {ad.prefixed(k): v for k, v in state.items()}
        if scale is None or shift is None:
            return out
        depth = branch.start
        trunk = {**self.encoder.state_dict(), **state}
        project = ad.embeddings_project
        if depth == 0 and project and f"{project}.weight" in trunk:
            norm: str | None = project  # the projection (a Linear) produces the blocks' input
        elif depth > 0:
            norm = f"{ad.blocks}.{depth - 1}.{ad.block_output_norm}" if ad.block_output_norm else None
        else:
            norm = ad.embeddings_norm
        if norm is None:
            raise GuardmergeError(
                f"task '{task}': cannot fold the branch alignment into a stock "
                f"{ad.model_type} model (no LayerNorm produces block {depth - 1}'s output)"
            )
        for kind in ("weight", "bias"):
            if f"{norm}.{kind}" not in trunk:
                raise GuardmergeError(f"task '{task}': tensor '{norm}.{kind}' not found to fold align into")
        w, b = trunk[f"{norm}.weight"], trunk[f"{norm}.bias"]
        s64, c64 = scale.double(), shift.double()
        rows = s64.reshape(-1, *([1] * (w.dim() - 1)))  # per output feature: a LayerNorm's or a Linear's
        out[ad.prefixed(f"{norm}.weight")] = (w.double() * rows).to(w.dtype)
        out[ad.prefixed(f"{norm}.bias")] = (b.double() * s64 + c64).to(b.dtype)
        return out


def _feats(hidden: torch.Tensor, pooled: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """What heads read: ``{"cls": [B, d], "tokens": [B, T, d]}`` from ``hidden`` ``[B, T, d]``,
    ``"pooled"`` where the encoder pools, and ``"mean"`` (the masked mean over tokens) when
    ``mask`` ``[B, T]`` is given."""
    feats = {"cls": hidden[:, 0], "tokens": hidden}
    if pooled is not None:
        feats["pooled"] = pooled
    if mask is not None:  # as ModernBERT's classifier_pooling "mean" computes it
        feats["mean"] = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    return feats


def load_any(path: str | Path, task: str | None = None) -> MultiHeadModel:
    """A merged folder as is, or a stock classifier folder as a one-head model."""
    from guardmerge.io.checkpoint import resolve

    if "guardmerge" in read_config(resolve(path)):  # checked: a JSON object, no code hints
        return MultiHeadModel.from_pretrained(resolve(path))
    return MultiHeadModel.from_classifier(path, task)


def head_from_tensors(task: str, spec: HeadSpec, tensors: Mapping[str, torch.Tensor]) -> Head:
    """Build ``task``'s head from ``tensors`` (``heads.<task>.<layer>.weight``...)."""
    lead = f"{HEAD_PREFIX}{task}."
    for name in spec.layout.tensor_names():
        if lead + name not in tensors:
            raise CheckpointError(f"head '{task}': tensor '{lead}{name}' is missing")
    shapes: list[tuple[int, int]] = []
    for name in spec.layers:
        weight = tensors[f"{lead}{name}.weight"]
        if weight.dim() != 2:
            raise CheckpointError(f"head '{task}': tensor '{lead}{name}.weight' is not a matrix")
        shapes.append((int(weight.shape[0]), int(weight.shape[1])))
    if len(spec.norms) >= len(spec.layers):
        raise CheckpointError(f"head '{task}': {len(spec.norms)} norms for {len(spec.layers) - 1} hidden layers")
    head = Head(spec, shapes)
    with torch.no_grad():
        for module_name, module in head.modules_by_name().items():
            for kind in ("weight", "bias"):
                param = getattr(module, kind)
                if param is None:
                    continue
                src = tensors[f"{lead}{module_name}.{kind}"]
                if tuple(src.shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"head '{task}': tensor '{lead}{module_name}.{kind}' has shape {list(src.shape)}, "
                        f"expected {list(param.shape)}"
                    )
                param.copy_(src)
    if head.linears[-1].out_features != len(spec.labels):
        raise CheckpointError(
            f"head '{task}' has {head.linears[-1].out_features} outputs but {len(spec.labels)} label names"
        )
    return head


def load_tokenizer(folder: str | Path, *, required: bool = False) -> Any:
    """The tokenizer saved in ``folder``: None when there is none (an error when ``required``).
    A tokenizer that points at code shipped with the model (``auto_map``) is refused."""
    from transformers import AutoTokenizer

    check_tokenizer_config(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # no tokenizer files, or unreadable ones
        if required:
            raise CheckpointError(f"{folder}: no usable tokenizer ({clip(exc, 200)})") from None
        log.warning("no usable tokenizer in %s (%s); predict() will need one", folder, clip(exc, 200))
        return None


def write_model_folder(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    tokenizer: Any = None,
) -> None:
    """Write weights (safetensors), ``config.json`` and the tokenizer into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    from guardmerge.io.writer import write_tensors

    write_tensors(folder, tensors)
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=False) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def folder_config(config: Mapping[str, Any], heads: Mapping[str, HeadSpec], info: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` of a merged folder: the encoder config plus a ``guardmerge`` section."""
    from guardmerge import __version__

    cfg = {k: v for k, v in config.items() if k != "guardmerge"}
    cfg["guardmerge"] = {
        "version": __version__,
        "heads": {t: s.to_dict() for t, s in heads.items()},
        **{k: v for k, v in info.items() if k not in ("heads", "version")},
    }
    return cfg


_TASK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def head_specs(raw: Any, where: Path) -> dict[str, HeadSpec]:
    """The ``guardmerge.heads`` section of ``config.json`` as :class:`HeadSpec` s, each field checked.

    Raises:
        CheckpointError: naming the file and the head whose entry is malformed.
    """
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{where}: 'guardmerge.heads' must map each task to its head")
    specs = {}
    for task, entry in raw.items():
        name = f"{where}: guardmerge.heads.{str(task)[:80]}"
        if not isinstance(task, str) or not _TASK_RE.fullmatch(task):
            raise CheckpointError(f"{name}: not a valid task name")
        if not isinstance(entry, dict):
            raise CheckpointError(f"{name}: expected an object")
        labels, layers = entry.get("labels"), entry.get("layers")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise CheckpointError(f"{name}.labels: expected a list of label names")
        if not isinstance(layers, list) or not layers or not all(isinstance(x, str) and x for x in layers):
            raise CheckpointError(f"{name}.layers: expected a list of layer names")
        if entry.get("input") not in HEAD_INPUTS:
            raise CheckpointError(f"{name}.input: expected one of {', '.join(HEAD_INPUTS)}")
        if entry.get("activation") not in activation_names():
            raise CheckpointError(f"{name}.activation: expected a transformers activation (tanh, relu, gelu...)")
        norms = entry.get("norms", [])
        if not isinstance(norms, list) or not all(isinstance(x, str) and x for x in norms):
            raise CheckpointError(f"{name}.norms: expected a list of layer names")
        if len(entry.get("norms", [])) >= len(layers):
            raise CheckpointError(f"{name}.norms: at most one per hidden layer ({len(layers) - 1})")
        eps = entry.get("norm_eps", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise CheckpointError(f"{name}.norm_eps: expected a small positive number")
        problem = entry.get("problem", "single_label")
        if problem not in PROBLEMS:
            raise CheckpointError(f"{name}.problem: expected one of {', '.join(PROBLEMS)}")
        if (problem == "token") != (entry["input"] == "tokens"):
            raise CheckpointError(f"{name}.input: a token head reads 'tokens', and only a token head does")
        thresholds = entry.get("thresholds", {})
        if (
            not isinstance(thresholds, dict)
            or not all(k in labels for k in thresholds)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in thresholds.values())
            or not all(0.0 <= v <= 1.0 for v in thresholds.values())
        ):
            raise CheckpointError(f"{name}.thresholds: expected label -> number in [0, 1] for labels of the head")
        benign = entry.get("benign")
        if benign is not None and (
            not isinstance(benign, list) or not all(isinstance(x, str) and x in labels for x in benign)
        ):
            raise CheckpointError(f"{name}.benign: expected a list of labels of the head")
        specs[task] = HeadSpec.from_dict(entry)
    return specs


def check_config_shapes(
    config: Mapping[str, Any], layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], folder: Path
) -> None:
    """Refuse a ``config.json`` whose encoder disagrees with the stored tensor shapes, before any
    memory is allocated for it (the encoder is built on the meta device to read its shapes)."""
    adapter = get_adapter(str(config.get("model_type", "")), where=str(folder / CONFIG_FILE))
    declared = config.get("num_hidden_layers")
    if adapter.blocks and isinstance(declared, int):
        names = [k.split(".", 2)[2] if k.startswith(BRANCH_PREFIX) and k.count(".") >= 2 else k for k in layout]
        found = adapter.num_blocks(names)
        if found != declared:
            raise CheckpointError(
                f"{folder / CONFIG_FILE} does not match the weights: num_hidden_layers is {declared}, "
                f"the weights hold {found} blocks"
            )
    try:
        with_pooler = has_pooler(adapter, layout)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_encoder(config, with_pooler).state_dict().items()}
    except Exception as exc:  # transformers raises ValueError, TypeError, KeyError on bad configs
        raise CheckpointError(f"{folder / 'config.json'}: not a usable encoder config: {str(exc)[:200]}") from None
    for key, (dtype, shape) in layout.items():
        if key.startswith((HEAD_PREFIX, BRANCH_PREFIX)) or key not in expected:
            continue
        if not dtype.is_floating_point and not key.endswith(_BUFFERS):
            raise CheckpointError(f"{folder}: tensor '{key}' is {dtype}, expected floating point")
        if expected[key] != tuple(shape):
            raise CheckpointError(
                f"{folder / 'config.json'} does not match the weights: tensor '{key}' is stored as "
                f"{list(shape)}, the config implies {list(expected[key])}"
            )
