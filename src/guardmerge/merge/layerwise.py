"""The layer-wise stage: solve every Linear layer on the merged model's own activations.

docs/algorithms.md 3a. For each task, the merged model and the task's expert read the same
tokenised texts. Block by block, from the embeddings upward (then the pooler, where the family
has one), each group of Linear layers that reads one input (q/k/v; attention output;
intermediate; output) is measured on the merged model *as solved so far*, solved by the method's
pure :attr:`~guardmerge.methods.LayerwiseSpec.solve`, and written into the merged block; then the
texts are pushed through the solved block. Padding tokens are masked out; each task's statistics
are a mean over its tokens, so every task weighs the same (times its expert weight).

What it needs of a family comes from the architecture adapter: where the blocks are
(``blocks``) and the pooler (``pooler``). Blocks are called with the arguments the encoder gave
them, captured once per batch by a forward pre-hook, so no family's attention-mask format is
rebuilt here. The experts' hidden states at every block input never change and are computed
once per task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from guardmerge.errors import GuardmergeError
from guardmerge.methods import BlockProblem, LayerwiseSpec, LinearSystem, MethodParams
from guardmerge.models.modules import blocks_at, first_output, module_at
from guardmerge.models.multihead import MultiHeadModel
from guardmerge.stats.batches import tokenize_batches
from guardmerge.stats.gram import model_inputs

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needs is captured."""


@dataclass
class _Call:
    """One batch as a block sees it: its call arguments besides the hidden states, and the
    flat indices of its non-padding tokens."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rows: torch.Tensor


def _capture_inputs(
    encoder: nn.Module, blocks: nn.ModuleList, batch: Mapping[str, torch.Tensor], upto: int | None
) -> tuple[list[torch.Tensor], list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Run ``encoder`` on ``batch``, recording each block's input hidden states and call
    arguments (blocks ``0..upto``; all, plus the last block's output, when ``upto`` is None)."""
    hidden: list[torch.Tensor] = []
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    last = len(blocks) - 1 if upto is None else upto

    def pre(i: int) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                hidden.append(args[0])
                calls.append((args[1:], dict(kwargs)))
            else:
                rest = dict(kwargs)
                hidden.append(rest.pop("hidden_states"))
                calls.append(((), rest))
            if upto is not None and i == upto:
                raise _Stop

        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks[: last + 1])]
    if upto is None:
        handles.append(blocks[-1].register_forward_hook(lambda _m, _a, out: hidden.append(first_output(out))))
    try:
        encoder(**model_inputs(encoder, batch))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return hidden, calls


def _call(block: nn.Module, hidden: torch.Tensor, call: _Call | None) -> torch.Tensor:
    if call is None:  # the pooler: called on the last hidden states alone
        return first_output(block(hidden))
    return first_output(block(hidden, *call.args, **call.kwargs))


def _center(layers: Sequence[nn.Module], weights: torch.Tensor, bias: bool) -> torch.Tensor:
    """The experts' weighted mean layer, ``[out, in]`` (``[out, in + 1]`` with the bias column), float64."""
    rows = []
    for layer in layers:
        m = cast(nn.Linear, layer)
        wt = m.weight.detach().double()
        if bias:
            b = m.bias.detach().double() if m.bias is not None else torch.zeros(wt.shape[0], dtype=torch.float64)
            wt = torch.cat([wt, b.unsqueeze(1)], dim=1)
        rows.append(wt)
    return (torch.stack(rows) * weights.reshape(-1, 1, 1)).sum(0) / float(weights.sum())


def linear_groups(block: nn.Module, hidden: torch.Tensor, call: _Call | None) -> list[list[str]]:
    """The block's Linear layers in call order, grouped by shared input (q/k/v read one tensor)."""
    order: list[tuple[str, torch.Tensor]] = []

    def hook(name: str) -> Callable[..., None]:
        return lambda _m, args: order.append((name, args[0]))

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    try:
        _call(block, hidden, call)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    previous: torch.Tensor | None = None
    for name, x in order:
        if previous is not None and x is previous and name not in groups[-1]:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = x
    seen = [n for g in groups for n in g]
    if len(seen) != len(set(seen)):
        raise GuardmergeError(
            f"a Linear layer of {type(block).__name__} runs twice per forward; "
            "the layer-wise stage cannot order its solves"
        )
    return groups


def _rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``[B, T, d]`` -> the non-padding tokens ``[n, d]``; ``[B, d]`` (pooled) as it is."""
    flat = x.reshape(-1, x.shape[-1])
    if x.dim() >= 3 and rows is not None:
        flat = flat.index_select(0, rows)
    return flat.detach()


def _grab(
    block: nn.Module, names: Sequence[str], hidden: torch.Tensor, call: _Call | None, outputs: bool
) -> dict[str, torch.Tensor]:
    """Run ``block`` until the Linear layers ``names`` have run; their inputs (or outputs)."""
    got: dict[str, torch.Tensor] = {}
    mods = {n: module_at(block, n) for n in names}

    def hook(name: str) -> Callable[..., None]:
        def fn(_: nn.Module, args: tuple[Any, ...], out: Any = None) -> None:
            got[name] = out if outputs else args[0]
            if len(got) == len(mods):
                raise _Stop

        return fn

    handles = [
        m.register_forward_hook(hook(n)) if outputs else m.register_forward_pre_hook(hook(n)) for n, m in mods.items()
    ]
    try:
        _call(block, hidden, call)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


@dataclass
class _Task:
    """One task's texts as both models see them, at the current depth."""

    calls: list[_Call]
    merged: list[torch.Tensor]  # merged model's hidden states at the current block input, per batch
    expert: list[list[torch.Tensor]]  # expert's hidden states at every block input (+ final), per batch
    blocks: nn.ModuleList  # the expert's blocks
    pooler: nn.Module | None
    weight: float


def _block_problem(
    prefix: str,
    block: nn.Module,
    tasks: Sequence[_Task],
    level: int,
    depth: int | None,
    base: Mapping[str, torch.Tensor],
    weights: torch.Tensor,
) -> BlockProblem | None:
    """The per-block fit's problem: the block's base and task vectors, a differentiable call on
    the merged inputs, and the experts' block outputs on their own inputs (None when the base
    lacks one of the block's tensors)."""
    names = [n for n, _ in block.named_parameters()]
    if any(f"{prefix}.{n}" not in base for n in names):
        return None
    theta0 = {n: base[f"{prefix}.{n}"].float() for n in names}
    owns = [tk.blocks[depth] if depth is not None else tk.pooler for tk in tasks]
    params = [dict(own.named_parameters()) for own in owns if own is not None]
    deltas = {n: torch.stack([p[n].detach().float() - theta0[n] for p in params]) for n in names}

    def call(task: _Task, b: int) -> _Call | None:
        return task.calls[b] if depth is not None else None

    def forward(parameters: Mapping[str, torch.Tensor], t: int, b: int) -> torch.Tensor:
        tk = tasks[t]
        c = call(tk, b)
        args = (tk.merged[b],) if c is None else (tk.merged[b], *c.args)
        out = first_output(functional_call(block, dict(parameters), args, {} if c is None else c.kwargs))
        flat = out.reshape(-1, out.shape[-1])
        return flat.index_select(0, c.rows) if c is not None and out.dim() >= 3 else flat

    targets = []
    for tk, own in zip(tasks, owns):
        assert own is not None
        per = []
        for b, hidden in enumerate(tk.expert):
            y = hidden[level + 1] if depth is not None else _call(own, hidden[level], None)
            per.append(_rows(y, tk.calls[b].rows if depth is not None else None).float())
        targets.append(per)
    return BlockProblem(prefix, theta0, deltas, forward, targets, weights)


@dataclass
class _Site:
    """One block (or the pooler) being solved: where it sits and how each task reaches it."""

    prefix: str
    block: nn.Module
    depth: int | None  # block index; None for the pooler
    level: int  # index into each expert's hidden states of this site's input

    def call(self, task: _Task, b: int) -> _Call | None:
        return task.calls[b] if self.depth is not None else None

    def expert(self, task: _Task) -> nn.Module:
        own = task.blocks[self.depth] if self.depth is not None else task.pooler
        assert own is not None  # checked by _sites
        return own


def _encoder_parts(
    model: MultiHeadModel, shared_blocks: int | None
) -> tuple[nn.Module, nn.ModuleList, nn.Module | None]:
    """The merged encoder, the blocks to solve and the pooler (None when absent or not solved)."""
    adapter = model.adapter
    if adapter.blocks is None:
        raise GuardmergeError(f"the layer-wise stage does not support model_type '{adapter.model_type}'")
    if model.tokenizer is None:
        raise GuardmergeError("the layer-wise stage needs the merged model's tokenizer")
    encoder = model.encoder.eval()
    blocks = blocks_at(encoder, adapter.blocks)
    pooler = (
        module_at(encoder, adapter.pooler)
        if adapter.pooler and hasattr(encoder, adapter.pooler) and getattr(encoder, adapter.pooler) is not None
        else None
    )
    if shared_blocks is not None:  # a branched trunk: its shared blocks only (not the branch point)
        blocks, pooler = blocks[:shared_blocks], None
    return encoder, blocks, pooler


def _prepare_tasks(
    model: MultiHeadModel,
    blocks: nn.ModuleList,
    experts: Mapping[str, MultiHeadModel],
    texts: Mapping[str, Sequence[str]],
    weights: Mapping[str, float],
    batch_size: int,
    max_length: int,
) -> dict[str, _Task]:
    """Tokenise each task's texts; capture the merged model's first block input and the expert's
    hidden states at every block input (they never change)."""
    adapter, encoder = model.adapter, model.encoder
    assert adapter.blocks is not None and model.tokenizer is not None
    tasks: dict[str, _Task] = {}
    for task, task_texts in texts.items():
        ex = experts[task].encoder.eval()
        batches = tokenize_batches(
            model.tokenizer, list(task_texts), batch_size=batch_size, max_length=max_length, sort_by_length=True
        )
        calls, merged, expert_hidden = [], [], []
        for batch in batches:
            h, cl = _capture_inputs(encoder, blocks, batch, upto=0)
            rows = batch["attention_mask"].reshape(-1).bool().nonzero().squeeze(1)
            calls.append(_Call(cl[0][0], cl[0][1], rows))
            merged.append(h[0])
            eh, _ = _capture_inputs(ex, blocks_at(ex, adapter.blocks), batch, upto=None)
            expert_hidden.append(eh)
        ex_pooler = getattr(ex, adapter.pooler, None) if adapter.pooler else None
        tasks[task] = _Task(
            calls, merged, expert_hidden, blocks_at(ex, adapter.blocks), ex_pooler, float(weights[task])
        )
    return tasks


def _sites(
    model: MultiHeadModel, blocks: nn.ModuleList, pooler: nn.Module | None, tasks: Mapping[str, _Task]
) -> list[_Site]:
    """The blocks from the embeddings up, then the pooler; every expert must have each one."""
    adapter = model.adapter
    sites = [_Site(f"{adapter.blocks}.{i}", b, i, i) for i, b in enumerate(blocks)]
    if pooler is not None:
        sites.append(_Site(adapter.pooler or "pooler", pooler, None, len(blocks)))
    for site in sites:
        for t, tk in tasks.items():
            if (tk.blocks[site.depth] if site.depth is not None else tk.pooler) is None:
                raise GuardmergeError(f"expert '{t}' has no pooler to fit the merged pooler to")
    return sites


def _fit_block(
    site: _Site,
    tasks: Mapping[str, _Task],
    base: Mapping[str, torch.Tensor],
    w: torch.Tensor,
    spec: LayerwiseSpec[Any],
    params: MethodParams,
) -> int:
    """A per-block ``fit`` of one site; 1 when fitted, 0 when the base lacks its tensors."""
    assert spec.fit is not None
    problem = _block_problem(site.prefix, site.block, list(tasks.values()), site.level, site.depth, base, w)
    if problem is None:
        log.warning("layer-wise fit: the base has no tensors for %s; it keeps the start merge", site.prefix)
        return 0
    fitted = spec.fit(problem, params)
    for pname, param in site.block.named_parameters():
        param.copy_(fitted[pname].to(param.dtype))
    return 1


def _expert_targets(
    site: _Site, tasks: Mapping[str, _Task], every: Sequence[str]
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Task -> per batch, the experts' own outputs of every Linear of the site (one expert pass a batch)."""
    return {
        t: [
            {
                n: _rows(y, tk.calls[b].rows).float()
                for n, y in _grab(site.expert(tk), every, hidden[site.level], site.call(tk, b), outputs=True).items()
            }
            for b, hidden in enumerate(tk.expert)
        ]
        for t, tk in tasks.items()
    }


def _group_statistics(
    site: _Site,
    group: Sequence[str],
    tasks: Mapping[str, _Task],
    targets: Mapping[str, list[dict[str, torch.Tensor]]],
    reference: Mapping[str, torch.Tensor],
    bias: bool,
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The per-task Gram ``[T, d, d]`` of the group's input on the merged model, and per task the
    cross products ``r x^T`` of each layer's residual target (means over tokens, float64)."""
    grams, crosses = [], []
    for t, tk in tasks.items():
        gram = None
        cr: dict[str, torch.Tensor] = {}
        count = 0
        for b, hidden in enumerate(tk.merged):
            x = _rows(
                _grab(site.block, group[:1], hidden, site.call(tk, b), outputs=False)[group[0]], tk.calls[b].rows
            ).float()
            if bias:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            # float32 products per batch, accumulated in float64 (as the Gram collector does)
            gram = (x.T @ x).double() if gram is None else gram.add_(x.T @ x)
            count += x.shape[0]
            for n in reference:
                r = targets[t][b][n] - x @ reference[n].T.float()
                cr[n] = (r.T @ x).double() if n not in cr else cr[n].add_(r.T @ x)
        assert gram is not None
        grams.append(gram / count)
        crosses.append({n: c / count for n, c in cr.items()})
    return torch.stack(grams), crosses


def _solve_group(
    site: _Site,
    group: Sequence[str],
    tasks: Mapping[str, _Task],
    targets: Mapping[str, list[dict[str, torch.Tensor]]],
    w: torch.Tensor,
    spec: LayerwiseSpec[Any],
    params: MethodParams,
) -> int:
    """Solve the Linear layers of one group (they read one input) by the method's ``solve``."""
    assert spec.solve is not None
    cross, bias = spec.cross, spec.bias
    ex_lins = {n: [module_at(site.expert(tk), n) for tk in tasks.values()] for n in group}
    # cross products are measured around the experts' mean layer (the residual of each target),
    # so a merge that equals the experts is solved to float32 rounding
    reference = {n: _center(ex_lins[n], w, bias) for n in group} if cross else {}
    g, crosses = _group_statistics(site, group, tasks, targets, reference, bias)
    for n in group:
        lin = module_at(site.block, n)
        assert isinstance(lin, nn.Linear)
        system = LinearSystem(
            name=f"{site.prefix}.{n}.weight",
            gram=g,
            cross=torch.stack([c[n] for c in crosses]) if cross else None,
            expert_weight=torch.stack([cast(nn.Linear, m).weight.detach() for m in ex_lins[n]]),
            expert_bias=None
            if lin.bias is None
            else torch.stack([cast(nn.Linear, m).bias.detach() for m in ex_lins[n]]),
            anchor_weight=lin.weight.detach().clone(),
            anchor_bias=None if lin.bias is None else lin.bias.detach().clone(),
            weights=w,
            reference=reference.get(n),
        )
        new_w, new_b = spec.solve(system, params)
        lin.weight.copy_(new_w.to(lin.weight.dtype))
        if new_b is not None and lin.bias is not None:
            lin.bias.copy_(new_b.to(lin.bias.dtype))
    return len(group)


def _solve_site(
    site: _Site, tasks: Mapping[str, _Task], w: torch.Tensor, spec: LayerwiseSpec[Any], params: MethodParams
) -> int:
    """Solve every Linear group of one site, in call order; the number of layers solved."""
    first = next(iter(tasks.values()))
    groups = linear_groups(site.block, first.merged[0], site.call(first, 0))
    targets = _expert_targets(site, tasks, [n for group in groups for n in group]) if spec.cross else {}
    return sum(_solve_group(site, group, tasks, targets, w, spec, params) for group in groups)


@torch.no_grad()
def layerwise_stage(
    model: MultiHeadModel,
    experts: Mapping[str, MultiHeadModel],
    texts: Mapping[str, Sequence[str]],
    weights: Mapping[str, float],
    spec: LayerwiseSpec[Any],
    params: MethodParams,
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    progress: bool = True,
    shared_blocks: int | None = None,
) -> dict[str, Any]:
    """Solve every Linear layer of ``model``'s encoder in place, from the embeddings up.

    Args:
        model: the starting merge (its Linear weights are the anchor the solves may pull toward).
        experts: task -> the expert as a one-head model (same family and tokenizer).
        texts: task -> unlabelled texts.
        weights: task -> expert weight ``w_i``.
        spec: the method's layer-wise spec: a pure per-Linear ``solve`` (with ``cross``: measure
            ``y x~^T``, expert outputs on expert inputs; ``bias``: append a ones column) or a
            per-block ``fit``; ``params`` its parameters.
        base: canonical name -> ``theta_0`` of the encoder's tensors (a per-block ``fit`` reads
            its task vectors against them; blocks whose base tensors are missing keep the start).
        shared_blocks: solve only the first ``shared_blocks`` blocks and not the pooler (a
            sharing depth ``K``: the blocks above are each task's own); None: every block, then
            the pooler.

    Returns:
        A report: layers solved, tokens per task, seconds.
    """
    started = time.perf_counter()
    if spec.fit is not None and base is None:
        raise GuardmergeError("a per-block layer-wise fit needs the base model's tensors")
    _, blocks, pooler = _encoder_parts(model, shared_blocks)
    if shared_blocks is not None and not blocks:
        log.info("layer-wise stage: share_layers 0, no shared block to solve")
        return {"layers": 0, "unit": "Linear layers", "tokens": {}, "seconds": 0.0}
    tasks = _prepare_tasks(model, blocks, experts, texts, weights, batch_size, max_length)
    tokens = {t: sum(int(c.rows.numel()) for c in tk.calls) for t, tk in tasks.items()}
    w = torch.tensor([tk.weight for tk in tasks.values()], dtype=torch.float64)
    solved = 0
    for site in tqdm(_sites(model, blocks, pooler, tasks), desc="layer-wise solve", unit="block", disable=not progress):
        if spec.fit is not None:
            assert base is not None
            solved += _fit_block(site, tasks, base, w, spec, params)
        else:
            solved += _solve_site(site, tasks, w, spec, params)
        if site.depth is not None:  # push every task's texts through the solved block
            for tk in tasks.values():
                tk.merged = [_call(site.block, h, tk.calls[b]) for b, h in enumerate(tk.merged)]
    seconds = time.perf_counter() - started
    unit = "blocks fitted" if spec.fit is not None else "Linear layers"
    log.info(
        "layer-wise stage: %d %s solved on %s tokens in %.1f s",
        solved,
        unit,
        ", ".join(f"{t} {n}" for t, n in tokens.items()),
        seconds,
    )
    return {"layers": solved, "unit": unit, "tokens": tokens, "seconds": seconds}
