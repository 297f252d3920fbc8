"""The heads of a multi-head model: :class:`HeadSpec` (how a task's head is built, the
``guardmerge.heads.<task>`` entry of ``config.json``), the :class:`Head` module, and building a
head from stored tensors (``heads.<task>.<layer>.{weight,bias}``) or a stock classifier's.

What differs between head kinds (``HeadSpec.problem``) is read from the head-kind table
(:mod:`guardmerge.models.head_kinds`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from guardmerge.errors import CheckpointError, GuardmergeError
from guardmerge.models.adapters import HEAD_INPUTS, HeadLayout
from guardmerge.models.head_kinds import DEFAULT_KIND, HEAD_KINDS, HeadKind, head_kind

HEAD_PREFIX = "heads."
"""Stored head tensors are ``heads.<task>.<layer>.{weight,bias}``."""


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
        problem: the head kind, a name in :data:`~guardmerge.models.head_kinds.HEAD_KINDS`:
            ``single_label`` (softmax), ``multi_label`` (a sigmoid per label) or ``token`` (a
            softmax per token).
        thresholds: label -> flag threshold of a sequence head's labels (others: 0.5).
        benign: the labels that never flag a text, where someone said so (the expert's
            ``benign:`` in the merge config); None: not given (see :mod:`guardmerge.models.benign`).

    Every layer and norm of a multi-head model's head carries a bias: where the stock head has
    none (ModernBERT's ``head.dense`` and ``head.norm`` by default) it is stored as zeros, so head
    alignment can fit one; :func:`~guardmerge.models.stock_export.export_task` drops a zero bias again.
    """

    labels: tuple[str, ...]
    layers: tuple[str, ...]
    input: str
    activation: str
    norms: tuple[str, ...] = ()
    norm_eps: float = 1e-5
    problem: str = DEFAULT_KIND
    thresholds: Mapping[str, float] = field(default_factory=dict)
    benign: tuple[str, ...] | None = None

    @classmethod
    def from_layout(
        cls,
        labels: Sequence[str],
        layout: HeadLayout,
        problem: str = DEFAULT_KIND,
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
        if self.problem != DEFAULT_KIND:
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
            problem=str(data.get("problem", DEFAULT_KIND)),
            thresholds={str(k): float(v) for k, v in (data.get("thresholds") or {}).items()},
            benign=None if data.get("benign") is None else tuple(data["benign"]),
        )

    @property
    def kind(self) -> HeadKind:
        """The head kind's entry in the head-kind table."""
        return head_kind(self.problem)

    @property
    def token(self) -> bool:
        """Whether this is a token-classification head (``[B, T, d] -> [B, T, C]``)."""
        return self.kind.per_token


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
        problem = entry.get("problem", DEFAULT_KIND)
        if problem not in HEAD_KINDS:
            raise CheckpointError(f"{name}.problem: expected one of {', '.join(HEAD_KINDS)}")
        if HEAD_KINDS[problem].per_token != (entry["input"] == "tokens"):
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
