"""Per-task branches of a model with a sharing depth (``share_layers: K``): the encoder becomes a
*trunk* of its first K blocks ending in a :class:`Capture` (the branch point), and each task owns
a :class:`Branch` (its expert's blocks ``K..L-1``, its pooler where the family has one, its
embeddings at ``K = 0``, and an optional per-feature affine ``align`` on the branch input),
stored under ``branches.<task>.<canonical name>``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from guardmerge.errors import CheckpointError, CompatibilityError, GuardmergeError
from guardmerge.models.adapters import ArchitectureAdapter
from guardmerge.models.modules import BUFFERS, blocks_at, first_output, module_at, no_init, transformers_version

BRANCH_PREFIX = "branches."
"""Stored branch tensors are ``branches.<task>.<canonical name>`` (and ``.align.scale`` / ``.shift``)."""


class Capture(nn.Module):
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


Call = tuple[tuple[Any, ...], dict[str, Any]]
"""A block call's arguments after the hidden states: ``(args, kwargs)`` (attention mask...)."""


class Tap(nn.Module):
    """A branch point inside the trunk (mixed sharing depths): a forward pre-hook on trunk block
    ``K`` (:meth:`attach`) that keeps, per thread, that block's input hidden states and call
    arguments for the branches of the tasks sharing only ``K`` blocks. The trunk's weights and
    tensor names stay as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[int, tuple[torch.Tensor, Call]] = {}

    def attach(self, block: nn.Module) -> None:
        """Hook onto ``block`` (a tap of an earlier model around the same block is dropped)."""
        hooks = block._forward_pre_hooks  # the one way to find an earlier tap
        for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), Tap)]:
            del hooks[key]
            getattr(block, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)
        block.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            hidden, rest, kw = args[0], args[1:], dict(kwargs)
        else:
            kw = dict(kwargs)
            hidden, rest = kw.pop("hidden_states"), ()
        self.calls[threading.get_ident()] = (hidden, (rest, kw))

    def take(self) -> tuple[torch.Tensor, Call]:
        """This thread's last ``(hidden states, call)`` at the tap (cleared)."""
        call = self.calls.pop(threading.get_ident(), None)
        if call is None:
            raise GuardmergeError("the trunk did not reach a branch point")
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
                    {f"{prefix}.{n}": t.detach() for n, t in module.state_dict().items() if not n.endswith(BUFFERS)}
                )
        if self.align is not None:
            out["align.scale"], out["align.shift"] = self.align.scale.detach(), self.align.shift.detach()
        return out


def cut_trunk(encoder: nn.Module, adapter: ArchitectureAdapter, share_layers: int) -> nn.Module:
    """Make ``encoder`` (in place) a trunk: its first ``share_layers`` blocks then the branch
    point, and no pooler (each branch owns one), so its last hidden state is depth K's.
    Needs transformers >= 5 (4.x blocks take and return other shapes: refused, never run)."""
    version = transformers_version()
    if int(version.split(".")[0]) < 5:
        raise CompatibilityError(
            f"share_layers: a model with a sharing depth needs transformers >= 5.9, this environment has "
            f"{version} (LLM Guard's pins 4.51): load it where guardmerge's own "
            "requirements hold, or export it with `guardmerge export-onnx` and use backend='onnx'"
        )
    problem = adapter.sharing_problem(_config_dict(encoder))
    if problem or adapter.blocks is None:
        raise GuardmergeError(f"share_layers: {problem}")
    blocks = blocks_at(encoder, adapter.blocks)
    parent_path, _, attr = adapter.blocks.rpartition(".")
    parent = module_at(encoder, parent_path) if parent_path else encoder
    setattr(parent, attr, nn.ModuleList([*list(blocks)[:share_layers], Capture(adapter.block_output_tuple)]))
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
        and not m.endswith(BUFFERS)
        and not (m.startswith(f"{adapter.pooler}.") and not with_pooler)
    ]
    unexpected = [u for u in unexpected if not u.endswith(BUFFERS)]
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
