"""RegMean Gram matrices: ``G = mean_x(x x^T)`` of every ``nn.Linear`` input.

RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models")
merges a Linear layer from the inner-product matrices of its inputs. This module runs one expert
(a Hugging Face ``*ForSequenceClassification`` model of any supported family) over batches
of tokenised inputs and collects, per Linear layer:

- the inputs, via forward pre-hooks, flattened to ``[tokens, in]``;
- padding tokens removed using the attention mask (default), or kept (``include_padding=True``,
  the reference code's behaviour, for parity);
- ``sum x x^T`` accumulated in float64 (each batch's product is a float32 matmul; on CPU only the
  upper triangle is computed, blockwise), and the number of rows;
- at the end the **mean** ``x x^T`` (so each expert counts equally, whatever its data size).

Linear layers that read the *same* input tensor in a forward pass (q, k and v) share one Gram: the
first such layer (in call order) is the group's *leader*, its canonical weight name is the Gram's
key, and the others map to it. The sharing is detected by tensor identity during the forward, so
each distinct input costs exactly one product.

Everything is keyed by **canonical weight names** (architecture prefix removed, see
:mod:`guardmerge.models.adapters`): ``encoder.layer.0.attention.self.query.weight``. Head Linear
layers (``classifier.weight``...) are included unless ``include_head=False`` and are listed in
:attr:`GramStats.head`.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from guardmerge.errors import StatisticsError
from guardmerge.models.adapters import ArchitectureAdapter, get_adapter

log = logging.getLogger(__name__)

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
"""Batch keys passed to the model's forward (when its signature accepts them)."""


@dataclass
class GramStats:
    """Gram matrices of one expert.

    Attributes:
        grams: Gram key -> ``[in, in]`` float64 mean of ``x x^T`` over the rows seen.
        weight_to_gram: canonical weight name -> Gram key (q/k/v map to one key; an unshared
            layer maps to its own weight name).
        tokens: Gram key -> number of rows (tokens, or examples for pooled inputs) averaged.
        head: canonical weight names of the head's Linear layers among ``weight_to_gram``.
        n_examples: examples seen.
        n_tokens: tokens seen (non-padding ones unless ``include_padding``).
        include_padding: whether padding tokens were included (reference-code parity).
        max_length: the tokeniser's ``max_length`` if known (metadata only).
    """

    grams: dict[str, torch.Tensor]
    weight_to_gram: dict[str, str]
    tokens: dict[str, int] = field(default_factory=dict)
    head: frozenset[str] = frozenset()
    n_examples: int = 0
    n_tokens: int = 0
    include_padding: bool = False
    max_length: int | None = None

    def gram(self, weight_name: str) -> torch.Tensor | None:
        """The ``[in, in]`` Gram of a canonical Linear weight name, or ``None``."""
        key = self.weight_to_gram.get(weight_name)
        return None if key is None else self.grams[key]

    def __contains__(self, weight_name: object) -> bool:
        return weight_name in self.weight_to_gram

    def names(self) -> list[str]:
        """Canonical weight names that have a Gram."""
        return list(self.weight_to_gram)


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The subset of ``batch`` the model's forward accepts, moved to the model's device."""
    accepted = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    out = {}
    for key in MODEL_INPUT_KEYS:
        if key in batch and key in accepted and batch[key] is not None:
            out[key] = torch.as_tensor(batch[key]).to(device)
    if "input_ids" not in out:
        raise StatisticsError("a statistics batch has no 'input_ids'")
    return out


def _blocked(rows: torch.Tensor, block: int) -> bool:
    """Whether :func:`_upper_gram_into` forms only the upper block triangle for these rows."""
    return rows.device.type == "cpu" and rows.shape[1] > block


def _upper_gram_into(acc: torch.Tensor, rows: torch.Tensor, block: int) -> None:
    """``acc += rows^T rows`` (the upper block triangle only, where :func:`_blocked`).

    ``rows``: ``[n, d]``. On CPU, for ``d > block``, the product is formed by row blocks of
    ``block`` over the upper block triangle (for d = 4 * block, 10 of 16 blocks); elsewhere as one
    full matmul. Each product runs in the rows' dtype (float32) and is added to the float64
    accumulator, once per batch.
    """
    d = rows.shape[1]
    if not _blocked(rows, block):
        acc.add_(rows.T @ rows)  # float32 product, promoted into the float64 accumulator
        return
    for i in range(0, d, block):
        j = min(i + block, d)
        acc[i:j, i:].add_(rows[:, i:j].T @ rows[:, i:])


def _fill_lower(acc: torch.Tensor, block: int) -> None:
    """In place: copy the upper block triangle (as :func:`_upper_gram_into` left it) below."""
    d = acc.shape[0]
    for i in range(block, d, block):
        j = min(i + block, d)
        acc[i:j, :i] = acc[:i, i:j].T


class GramCollector:
    """Forward pre-hooks on every Linear of a model; use as a context manager.

    Call :meth:`set_batch` with the batch's attention mask before each forward, then
    :meth:`result` once at the end. :func:`collect_grams` does all of this.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        adapter: ArchitectureAdapter | None = None,
        include_padding: bool = False,
        include_head: bool = True,
        block_size: int = 384,
    ) -> None:
        self.model = model
        self.adapter = adapter or get_adapter(getattr(model.config, "model_type", ""), "model")
        self.include_padding = include_padding
        self.block_size = block_size
        self._modules: dict[str, nn.Linear] = {}
        self.head: set[str] = set()
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            canonical = self.adapter.canonical(f"{name}.weight")
            if self.adapter.is_ignored(canonical):
                continue
            if self.adapter.is_head(canonical):
                if not include_head:
                    continue
                self.head.add(canonical)
            self._modules[canonical] = module
        if not self._modules:
            raise StatisticsError("the model has no nn.Linear layers to collect Grams for")
        self._acc: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int] = {}
        self._upper_only: set[str] = set()  # accumulators holding the upper block triangle
        self.weight_to_gram: dict[str, str] = {}
        # per forward: id(input) -> (weak reference to the input, leader key)
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self._row_index: torch.Tensor | None = None
        self._mask_shape: tuple[int, ...] | None = None
        self._handles: list[Any] = []
        self.n_examples = 0
        self.n_tokens = 0

    def __enter__(self) -> GramCollector:
        for canonical, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(canonical)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def set_batch(self, attention_mask: torch.Tensor | None, input_shape: tuple[int, ...]) -> None:
        """Prepare for the next forward: the rows to keep and the per-forward identity map."""
        self._seen.clear()
        if attention_mask is None:
            attention_mask = torch.ones(input_shape, dtype=torch.long)
        mask = attention_mask.to(torch.bool)
        self._mask_shape = tuple(mask.shape)
        self.n_examples += int(mask.shape[0])
        if self.include_padding:
            self._row_index = None
            self.n_tokens += int(mask.numel())
        else:
            self._row_index = mask.reshape(-1).nonzero().squeeze(1)
            self.n_tokens += int(self._row_index.numel())

    def _rows_of(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        if x.dim() >= 3 and self._mask_shape is not None and tuple(x.shape[:2]) == self._mask_shape:
            flat = x.reshape(-1, d)
            if self._row_index is not None:
                flat = flat.index_select(0, self._row_index.to(flat.device))
            return flat
        # pooled / first-token inputs ([batch, in]) are never padding
        return x.reshape(-1, d)

    def _hook(self, canonical: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            entry = self._seen.get(id(x))
            leader = entry[1] if entry is not None and entry[0]() is x else None
            known = self.weight_to_gram.get(canonical)
            if leader is None:
                self._seen[id(x)] = (weakref.ref(x), canonical)
                leader = canonical
            if known is not None and known != leader:
                raise StatisticsError(
                    f"Gram sharing of '{canonical}' changed between batches ('{known}' before, '{leader}' now)"
                )
            self.weight_to_gram[canonical] = leader
            if leader != canonical:
                return  # shares the leader's input: its Gram is already counted
            rows = self._rows_of(x).detach()
            if rows.dtype not in (torch.float32, torch.float64):
                rows = rows.float()
            acc = self._acc.get(canonical)
            if acc is None:
                acc_device = rows.device if rows.device.type != "mps" else torch.device("cpu")
                acc = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=acc_device)
                self._acc[canonical] = acc
            rows = rows.to(acc.device)
            if _blocked(rows, self.block_size):
                self._upper_only.add(canonical)
            _upper_gram_into(acc, rows, self.block_size)
            self._rows[canonical] = self._rows.get(canonical, 0) + int(rows.shape[0])

        return hook

    def result(self, max_length: int | None = None) -> GramStats:
        """The mean Grams (on CPU, float64). Finalises the accumulators in place: call once."""
        missing = [n for n in self._modules if n not in self.weight_to_gram]
        if missing:
            log.warning("Linear layers never called during Gram collection: %s", ", ".join(missing))
        grams: dict[str, torch.Tensor] = {}
        for key, acc in self._acc.items():
            rows = self._rows[key]
            if rows == 0:
                raise StatisticsError(f"no input rows reached '{key}' (all padding?)")
            acc.div_(rows)
            if key in self._upper_only:
                _fill_lower(acc, self.block_size)
            grams[key] = acc.cpu()
        order = [n for n in self._modules if n in self.weight_to_gram]
        return GramStats(
            grams=grams,
            weight_to_gram={n: self.weight_to_gram[n] for n in order},
            tokens=dict(self._rows),
            head=frozenset(n for n in order if n in self.head),
            n_examples=self.n_examples,
            n_tokens=self.n_tokens,
            include_padding=self.include_padding,
            max_length=max_length,
        )


@torch.no_grad()
def collect_grams(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    include_padding: bool = False,
    include_head: bool = True,
    adapter: ArchitectureAdapter | None = None,
    max_length: int | None = None,
    block_size: int = 384,
    progress: bool = True,
) -> GramStats:
    """Run ``model`` over ``batches`` and return the mean Gram of every Linear input.

    Args:
        model: a ``*ForSequenceClassification`` model (any supported family); it is put in
            eval mode for the pass and its mode restored afterwards.
        batches: tokenised batches: mappings with ``input_ids`` ``[B, T]``, ``attention_mask``
            ``[B, T]`` and optionally ``token_type_ids`` (other keys, e.g. ``labels``, ignored).
        include_padding: keep padding tokens (reference-code parity); default masks them out.
        include_head: also collect the head's Linear inputs (flagged in ``GramStats.head``).
        adapter: the architecture adapter; default from ``model.config.model_type``.
        max_length: recorded in the result's metadata.
        block_size: CPU column-block size of the upper-triangular product.
        progress: show a tqdm bar.

    Returns:
        :class:`GramStats` keyed by canonical weight names; Grams ``[in, in]`` float64 on CPU.
    """
    was_training = model.training
    model.eval()
    collector = GramCollector(
        model,
        adapter=adapter,
        include_padding=include_padding,
        include_head=include_head,
        block_size=block_size,
    )
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    try:
        with collector:
            for batch in tqdm(batches, total=total, desc="gram", disable=not progress, leave=False):
                inputs = model_inputs(model, batch)
                collector.set_batch(inputs.get("attention_mask"), tuple(inputs["input_ids"].shape))
                model(**inputs)
    finally:
        model.train(was_training)
    if collector.n_examples == 0:
        raise StatisticsError("no batches given: cannot compute Grams from zero examples")
    stats = collector.result(max_length=max_length)
    log.info(
        "Grams: %d Linear layers, %d distinct inputs, %d examples, %d tokens",
        len(stats.weight_to_gram),
        len(stats.grams),
        stats.n_examples,
        stats.n_tokens,
    )
    return stats
