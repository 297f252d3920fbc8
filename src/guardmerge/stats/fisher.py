"""Diagonal Fisher information of an expert, from per-example squared gradients.

Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging") weights
each parameter by the expert's diagonal Fisher

    F[p] = E_x E_{y ~ p(y|x)} (d log p(y|x) / d theta[p])^2

estimated on the expert's own inputs. The expectation over ``y`` is one of three label modes:

- ``hard``: ``y = argmax_y p(y|x)``, the model's own prediction (one gradient per example);
- ``soft``: the exact expectation ``sum_y p(y|x) (d log p(y|x)/d theta)^2`` (C gradients per
  example, C = number of labels);
- ``empirical``: the gold label given in the batch (``labels``).

Gradients are **per example**, vectorised with ``torch.func`` (``functional_call`` +
``vmap(grad)``), in micro-batches of ``micro_batch_size`` examples to bound memory (one
``[micro_batch, *shape]`` gradient per parameter is alive at a time). The reference codes instead
square the gradient of a whole batch's mean log-likelihood; that approximation is available only
as the named parity mode ``gradient="batch"`` (it depends on the batch size).

The result is the **mean** over examples, keyed by canonical parameter names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from guardmerge.errors import ConfigError, DataError, StatisticsError
from guardmerge.models.adapters import ArchitectureAdapter, get_adapter
from guardmerge.stats.gram import model_inputs

log = logging.getLogger(__name__)

LabelMode = Literal["hard", "soft", "empirical"]
GradientMode = Literal["per_example", "batch"]
LABEL_MODES: tuple[str, ...] = ("hard", "soft", "empirical")
GRADIENT_MODES: tuple[str, ...] = ("per_example", "batch")


@dataclass
class FisherStats:
    """Diagonal Fisher of one expert.

    Attributes:
        fisher: canonical parameter name -> ``[*shape]`` float32 mean squared gradient.
        n_examples: examples averaged.
        label_mode: ``hard``, ``soft`` or ``empirical``.
        gradient: ``per_example`` (default) or ``batch`` (reference-code parity).
        head: canonical names of head parameters among ``fisher``.
        max_length: the tokeniser's ``max_length`` if known (metadata only).
    """

    fisher: dict[str, torch.Tensor]
    n_examples: int
    label_mode: str = "hard"
    gradient: str = "per_example"
    head: frozenset[str] = frozenset()
    max_length: int | None = None

    def __contains__(self, name: object) -> bool:
        return name in self.fisher

    def names(self) -> list[str]:
        return list(self.fisher)


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Use eager attention while vmapping (SDPA has no vmap batching rule on CPU); restore after."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    switched = False
    if impl not in (None, "eager") and callable(switch):
        try:
            switch("eager")
            switched = True
        except Exception:  # an implementation that cannot switch keeps its own
            log.debug("could not switch attention to eager; keeping %s", impl)
    try:
        yield
    finally:
        if switched and callable(switch):
            switch(impl)


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., T]`` 0/1 mask -> ``[..., 1, 1, T]`` additive mask (0 keep, dtype-min drop).

    A prepared 4D mask skips transformers' mask construction, whose data-dependent shortcuts
    (``mask.all()``) cannot run under ``vmap``.
    """
    return (1.0 - mask.to(dtype)).unsqueeze(-2).unsqueeze(-2) * torch.finfo(dtype).min


_MASK_ADVICE = (
    "per-example Fisher needs a prepared additive attention mask, which {family} models read "
    "differently ({detail}); set statistics.fisher_gradient: batch"
)


def _check_additive_mask(model: nn.Module, inputs: Mapping[str, torch.Tensor], logits: torch.Tensor) -> None:
    """Refuse per-example Fisher where the model reads a prepared additive mask otherwise than
    its 0/1 mask (DeBERTa's embeddings multiply by the mask; ModernBERT's sliding-window layers and
    mean pooling build from the 0/1 mask): its logits on ``inputs`` must equal ``logits``."""
    family = getattr(model.config, "model_type", "this")
    try:
        with torch.no_grad():
            got = model(**inputs).logits.double()
        gap = float((got - logits).abs().max()) if bool(torch.isfinite(got).all()) else float("inf")
    except RuntimeError:  # a pooling that reads the mask's shape
        gap = float("inf")
    if not gap <= 1e-4 * (1.0 + float(logits.abs().max())):
        raise StatisticsError(_MASK_ADVICE.format(family=family, detail=f"logits change by {gap:.3g}"))


def _labels_of(batch: Mapping[str, Any], n: int) -> torch.Tensor:
    for key in ("labels", "label"):
        if key in batch and batch[key] is not None:
            labels = torch.as_tensor(batch[key]).long().reshape(-1)
            if labels.numel() != n:
                raise DataError(f"a Fisher batch has {n} examples but {labels.numel()} labels")
            return labels
    raise DataError("label_mode 'empirical' needs gold labels: the batches carry no 'labels'")


def _check_modes(label_mode: str, gradient: str) -> None:
    if label_mode not in LABEL_MODES:
        raise ConfigError(f"unknown Fisher label mode '{label_mode}'; known: {', '.join(LABEL_MODES)}")
    if gradient not in GRADIENT_MODES:
        raise ConfigError(f"unknown Fisher gradient mode '{gradient}'; known: {', '.join(GRADIENT_MODES)}")
    if gradient == "batch" and label_mode == "soft":
        raise ConfigError(
            "Fisher gradient mode 'batch' (reference parity) supports label modes "
            "'hard' and 'empirical' only, not 'soft'"
        )


def _fisher_names(
    model: nn.Module, adapter: ArchitectureAdapter, include_head: bool
) -> tuple[dict[str, str], set[str]]:
    """Module parameter name -> canonical name of every parameter a Fisher covers, and the head's."""
    names: dict[str, str] = {}
    head: set[str] = set()
    for pname, _ in model.named_parameters():
        canonical = adapter.canonical(pname)
        if adapter.is_ignored(canonical):
            continue
        if adapter.is_head(canonical):
            if not include_head:
                continue
            head.add(canonical)
        names[pname] = canonical
    if not names:
        raise StatisticsError("the model has no parameters to compute a Fisher for")
    return names, head


def collect_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    label_mode: LabelMode = "hard",
    gradient: GradientMode = "per_example",
    micro_batch_size: int = 8,
    include_head: bool = True,
    adapter: ArchitectureAdapter | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> FisherStats:
    """Diagonal Fisher of ``model`` over ``batches``: the mean of per-example squared gradients.

    Args:
        model: a ``*ForSequenceClassification`` model (any supported family); evaluated in
            eval mode (no dropout), its mode restored afterwards.
        batches: tokenised batches (``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]``,
            optional ``token_type_ids``; ``labels`` ``[B]`` for ``empirical``).
        label_mode: ``hard`` | ``soft`` | ``empirical`` (see module docstring).
        gradient: ``per_example`` (default, vmap) or ``batch``: square the gradient of each
            batch's mean log-likelihood, averaged over batches (reference-code parity).
        micro_batch_size: examples per vmapped gradient (memory ~ micro_batch_size x model size).
        include_head: keep the head's parameters (flagged in ``FisherStats.head``).
        adapter: the architecture adapter; default from ``model.config.model_type``.
        max_length: recorded in the result's metadata.
        progress: show a tqdm bar.

    Returns:
        :class:`FisherStats`, float32 tensors on CPU keyed by canonical parameter names.
    """
    _check_modes(label_mode, gradient)
    if micro_batch_size < 1:
        raise ConfigError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    adapter = adapter or get_adapter(getattr(model.config, "model_type", ""), "model")
    if gradient == "per_example" and not adapter.additive_mask:
        raise StatisticsError(
            _MASK_ADVICE.format(
                family=adapter.model_type, detail="it derives more than the padding mask from the 0/1 mask"
            )
        )
    names, head = _fisher_names(model, adapter, include_head)

    was_training = model.training
    model.eval()
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    acc: dict[str, torch.Tensor] = {}
    n_examples = 0
    n_batches = 0
    try:
        with _eager_attention(model):
            for batch in tqdm(batches, total=total, desc=f"fisher ({label_mode})", disable=not progress, leave=False):
                inputs = model_inputs(model, batch)
                n = int(inputs["input_ids"].shape[0])
                labels = _labels_of(batch, n) if label_mode == "empirical" else None
                if gradient == "batch":
                    _batch_fisher(model, inputs, labels, names, acc)
                else:
                    _per_example_fisher(model, inputs, labels, label_mode, micro_batch_size, names, acc)
                n_examples += n
                n_batches += 1
    finally:
        model.train(was_training)
    if n_examples == 0:
        raise StatisticsError("no batches given: cannot compute a Fisher from zero examples")
    denom = n_batches if gradient == "batch" else n_examples
    fisher = {names[p]: (acc[p] / denom).float().cpu() for p in names if p in acc}
    log.info("Fisher (%s, %s): %d tensors, %d examples", label_mode, gradient, len(fisher), n_examples)
    return FisherStats(
        fisher=fisher,
        n_examples=n_examples,
        label_mode=label_mode,
        gradient=gradient,
        head=frozenset(head),
        max_length=max_length,
    )


def _accumulate(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """``acc[name] += value``, the accumulator in float64."""
    if name in acc:
        acc[name] += value
    else:
        acc[name] = value.to(torch.float64)


def _input_embedding(model: nn.Module, names: dict[str, str]) -> tuple[nn.Embedding, str] | None:
    """The word-embedding module and its parameter name, if it is among the Fisher's params."""
    get = getattr(model, "get_input_embeddings", None)
    module = get() if callable(get) else None
    if not isinstance(module, nn.Embedding):
        return None
    for pname, param in model.named_parameters():
        if param is module.weight and pname in names:
            return module, pname
    return None


def _per_example_fisher(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor | None,
    label_mode: str,
    micro_batch_size: int,
    names: dict[str, str],
    acc: dict[str, torch.Tensor],
) -> None:
    """Add ``sum_x E_y (d log p(y|x) / d theta)^2`` of one batch to ``acc`` (float64).

    The word-embedding matrix is handled apart: a dense per-example gradient would be
    ``[micro_batch, vocab, hidden]``, mostly zeros. Instead the per-example gradient of the
    embedding layer's *output* (``[T, hidden]``, via a zero offset added by a forward hook) is
    summed per token id, squared and scattered into the vocabulary rows: the same numbers,
    exactly, at a fraction of the memory and time.
    """
    embedding = _input_embedding(model, names)
    emb_name = embedding[1] if embedding is not None else None
    params = {p: t.detach() for p, t in model.named_parameters() if p in names and p != emb_name}
    frozen = {p: t.detach() for p, t in model.named_parameters() if p not in params}
    buffers = dict(model.named_buffers())
    dtype = next(iter(params.values())).dtype
    with torch.no_grad():
        logits = model(**inputs).logits.double()
    probs = torch.softmax(logits, dim=-1)  # [B, C]
    n, n_classes = probs.shape
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    per_example = {k: v for k, v in inputs.items() if k != "attention_mask"}
    per_example["attention_mask"] = _additive_mask(mask, dtype)  # [B, 1, 1, T]
    _check_additive_mask(model, per_example, logits)
    ids = inputs["input_ids"]
    offset: dict[str, torch.Tensor] = {}

    def add_offset(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + offset["value"] if "value" in offset else output

    def log_lik(
        p: dict[str, torch.Tensor], emb_offset: torch.Tensor, target: torch.Tensor, ex: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        kwargs = {k: v.unsqueeze(0) for k, v in ex.items()}
        offset["value"] = emb_offset.unsqueeze(0)
        try:
            out = functional_call(model, ({**p, **frozen}, buffers), args=(), kwargs=kwargs)
        finally:
            offset.clear()
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
        return (logp * target).sum()

    per_example_grad = vmap(grad(log_lik, argnums=(0, 1)), in_dims=(None, 0, 0, 0))
    device = probs.device
    if label_mode == "soft":
        targets = [(torch.full((n,), c, device=device), probs[:, c]) for c in range(n_classes)]
    else:
        y = probs.argmax(dim=-1) if labels is None else labels.to(device)
        if int(y.max()) >= n_classes or int(y.min()) < 0:
            raise DataError(f"gold labels outside [0, {n_classes}) in a Fisher batch")
        targets = [(y, torch.ones(n, dtype=torch.float64, device=device))]
    handle = embedding[0].register_forward_hook(add_offset) if embedding is not None else None
    try:
        for start in range(0, n, micro_batch_size):
            sl = slice(start, start + micro_batch_size)
            ex = {k: v[sl] for k, v in per_example.items()}
            m = int(ids[sl].shape[0])
            hidden = embedding[0].weight.shape[1] if embedding is not None else 1
            zeros = torch.zeros(m, ids.shape[1], hidden, dtype=dtype, device=ids.device)
            for y, weight in targets:
                onehot = torch.nn.functional.one_hot(y[sl], n_classes).to(dtype)
                grads, emb_grad = per_example_grad(params, zeros, onehot, ex)
                w = weight[sl].to(torch.float32)
                for pname, g in grads.items():
                    # float32 squares summed over <= micro_batch_size examples, added in float64
                    _accumulate(acc, pname, torch.tensordot(w, g.detach().square(), dims=1))
                if embedding is not None:
                    _accumulate_embedding(acc, embedding[1], embedding[0].weight, ids[sl], emb_grad.detach(), w)
    finally:
        if handle is not None:
            handle.remove()


def _accumulate_embedding(
    acc: dict[str, torch.Tensor],
    name: str,
    weight: torch.Tensor,
    ids: torch.Tensor,
    out_grad: torch.Tensor,
    w: torch.Tensor,
) -> None:
    """Add ``sum_x w_x (d/dE)^2`` for an embedding matrix ``E`` [V, H] from per-example gradients
    of its output ``out_grad`` [m, T, H] and the token ids [m, T]: per example, the gradient of
    row ``v`` is the sum of the output gradients at the positions holding token ``v``."""
    vocab, hidden = weight.shape
    m = ids.shape[0]
    keys = ids.to(torch.long) + vocab * torch.arange(m, device=ids.device).unsqueeze(1)
    uniq, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
    rows = torch.zeros(uniq.numel(), hidden, dtype=out_grad.dtype, device=out_grad.device)
    rows.index_add_(0, inverse, out_grad.reshape(-1, hidden))
    sq = rows.double().square_() * w.to(torch.float64)[uniq // vocab].unsqueeze(1)
    if name not in acc:
        acc[name] = torch.zeros(vocab, hidden, dtype=torch.float64, device=weight.device)
    acc[name].index_add_(0, uniq % vocab, sq.to(acc[name].device))


def _batch_fisher(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor | None,
    names: dict[str, str],
    acc: dict[str, torch.Tensor],
) -> None:
    """Add ``(d mean_b log p(y_b|x_b))^2`` of one batch to ``acc`` (reference-code parity)."""
    params = [(p, t) for p, t in model.named_parameters() if p in names]
    logits = model(**inputs).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    y = logits.argmax(dim=-1).detach() if labels is None else labels.to(logits.device)
    objective = logp.gather(1, y.unsqueeze(1)).mean()
    grads = torch.autograd.grad(objective, [t for _, t in params], allow_unused=True)
    for (pname, t), g in zip(params, grads):
        value = torch.zeros_like(t, dtype=torch.float64) if g is None else g.double().square()
        _accumulate(acc, pname, value)
