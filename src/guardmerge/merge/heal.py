"""The heal stage (docs/algorithms.md 3c; issue 23 section 2): label-free multi-teacher
distillation of the merged model from the experts, the one stage that trains weights.

Every expert (teacher) runs once over a pool of unlabelled texts drawn from **all** tasks'
``data:`` files (labels are never read); its outputs are cached on disk, keyed by the expert's
fingerprint (:func:`guardmerge.stats.expert_fingerprint`), a digest of the pool and
``max_length``. The merged model (student: encoder, heads, branches) then trains with AdamW
(linear warm-up, linear decay) so that each head matches its own expert on every text of the
pool, by its head kind's ``distill_loss`` (:mod:`guardmerge.models.head_kinds`), weighted per
task. A seeded slice of the pool is held out: training stops early when the mean agreement with
the experts there stops rising (held-out loss breaks ties), and the best state is kept, so the
training-free merge is where it starts and what it falls back to.

Speed: forward passes run under bfloat16 autocast where the hardware multiplies bfloat16
natively (``precision: auto``; the loss, the agreement and the weights stay float32), and texts of
similar length are batched together (teachers in length order; each training epoch sorts seeded
windows of its shuffle by length), so short tweets are not padded to a long prompt's length.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save
from transformers import get_linear_schedule_with_warmup

from guardmerge.config import HealConfig
from guardmerge.errors import GuardmergeError
from guardmerge.io.atomic import atomic_file
from guardmerge.merge.statistics import default_cache_dir, text_digest
from guardmerge.models.adapters import capped_length
from guardmerge.models.modules import blocks_at
from guardmerge.models.multihead import MultiHeadModel
from guardmerge.stats import derive_fingerprint, expert_fingerprint

if TYPE_CHECKING:
    from guardmerge.merge.job import MergeJob

log = logging.getLogger(__name__)

CACHE_FORMAT = "guardmerge-heal-teacher"
BUCKET_BATCHES = 32
"""Batches per length-sorted window of a training epoch's shuffle."""


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: a CUDA GPU with bfloat16, or a CPU with
    AMX or AVX512-BF16 (elsewhere bfloat16 autocast is emulated and slower than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    except RuntimeError:
        return False


def heal_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of heal's forward passes (``None``: float32): ``bfloat16``, ``float32``,
    or ``auto`` (bfloat16 where :func:`native_bfloat16`, else float32)."""
    if precision == "bfloat16" or (precision == "auto" and native_bfloat16(device)):
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """``float32`` for ``None``, else the dtype's name (``bfloat16``)."""
    return str(dtype or torch.float32).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device`` (a no-op for ``None``)."""
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def text_lengths(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[int]:
    """Tokens per text after truncation to ``max_length``."""
    return [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]


@dataclass(frozen=True)
class Teacher:
    """One expert's logits on the pool: ``rows`` ``[R, C]`` (float32), ``counts[i]`` rows for text
    ``i`` (1 for a sequence head, its non-padding tokens for a token head)."""

    rows: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "starts", torch.cumsum(self.counts, 0) - self.counts)

    def take(self, index: Sequence[int]) -> torch.Tensor:
        """The rows of texts ``index``, text after text."""
        parts = [self.rows[int(self.starts[i]) : int(self.starts[i] + self.counts[i])] for i in index]
        return torch.cat(parts) if parts else self.rows[:0]

    def target(self, index: Sequence[int], mask: torch.Tensor, per_token: bool, task: str) -> torch.Tensor:
        """The expert's logits shaped as the student's on a batch: ``[B, C]``, or for a token head
        ``[B, T, C]`` with its rows on the non-padding tokens of ``mask``."""
        rows = self.take(index)
        if not per_token:
            return rows
        keep = mask.bool()
        if int(keep.sum()) != rows.shape[0]:
            raise GuardmergeError(
                f"heal: head '{task}': the merged model reads {int(keep.sum())} tokens where its expert read "
                f"{rows.shape[0]} (they tokenise the texts differently)"
            )
        full = rows.new_zeros(*mask.shape, rows.shape[-1])
        full[keep] = rows
        return full


# -- the pool and the teachers ----------------------------------------------------------------


def heal_pool(texts: Mapping[str, Sequence[str]], per_task: int) -> tuple[list[str], dict[str, int]]:
    """The first ``per_task`` texts of every task, pooled in task order without repeats, and how
    many each task gave."""
    pool: dict[str, None] = {}
    sizes = {}
    for task, items in texts.items():
        chosen = list(items)[:per_task]
        sizes[task] = len(chosen)
        pool.update(dict.fromkeys(chosen))
    return list(pool), sizes


@torch.no_grad()
def teacher_outputs(
    expert: MultiHeadModel,
    task: str,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    dtype: torch.dtype | None = None,
) -> Teacher:
    """Run ``expert`` (a one-head model with its tokenizer) once over ``texts``, in batches of
    similar length, under autocast to ``dtype`` (``None``: float32); rows in text order."""
    expert.eval()
    per_token = expert.kind(task).per_token
    lengths = text_lengths(expert.tokenizer, texts, max_length)
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    per_text: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    device = model_device(expert)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = expert.encode([texts[i] for i in index], max_length)
        with autocast(device, dtype):
            logits = expert(tasks=[task], **batch)[task].float()
        keep = batch["attention_mask"].bool()
        for row, i in enumerate(index):
            per_text[i] = logits[row][keep[row]] if per_token else logits[row : row + 1]
    rows = torch.cat(per_text) if per_text else torch.empty(0)
    return Teacher(rows, torch.tensor([len(r) for r in per_text], dtype=torch.long))


def teacher_key(folder: str | Path, texts: Sequence[str], max_length: int, dtype: torch.dtype | None = None) -> str:
    """The cache key of an expert's outputs: its fingerprint, the pool's digest, ``max_length``
    and the autocast dtype."""
    extra = (
        {"precision": precision_name(dtype)} if dtype is not None else {}
    )  # float32 keys stay those of earlier caches
    key = derive_fingerprint(
        expert_fingerprint(folder), texts=text_digest(texts), max_length=max_length, use="heal", **extra
    )
    return key.split(":")[-1][:24]


def cached_teacher(
    folder: str | Path,
    task: str,
    texts: Sequence[str],
    run: Callable[[], Teacher],
    *,
    max_length: int,
    cache: Path | None,
    dtype: torch.dtype | None = None,
) -> tuple[Teacher, bool]:
    """``(outputs, from cache)``: the expert's outputs read from ``cache``, else computed with
    ``run()`` (and written there when ``cache`` is given)."""
    path = cache / f"{task}-{teacher_key(folder, texts, max_length, dtype)}.safetensors" if cache else None
    if path is not None and path.is_file():
        data = load_file(str(path))
        log.info("heal: teacher '%s' outputs cached in %s", task, path)
        return Teacher(data["rows"], data["counts"]), True
    teacher = run()
    if path is not None:
        tensors = {"rows": teacher.rows.contiguous(), "counts": teacher.counts.contiguous()}
        with atomic_file(path, force=True) as fh:  # a kill never leaves a partial cache file
            fh.write(save(tensors, metadata={"format": CACHE_FORMAT, "task": task, "texts": str(len(texts))}))
    return teacher, False


def _teachers(
    job: MergeJob, pool: Sequence[str], cfg: HealConfig, max_length: int, dtype: torch.dtype | None
) -> tuple[dict[str, Teacher], dict]:
    """Every expert's outputs on ``pool`` (cached when ``cfg.cache``) and how they were had."""
    cache = default_cache_dir() / "heal" if cfg.cache else None
    teachers, cached = {}, {}
    for e in job.experts:

        def run(task: str = e.task) -> Teacher:
            log.info("heal: running expert '%s' on %d pooled texts", task, len(pool))
            expert = job.expert_model(task)
            return teacher_outputs(expert, task, pool, max_length=max_length, batch_size=cfg.batch_size, dtype=dtype)

        teachers[e.task], cached[e.task] = cached_teacher(
            e.folder, e.task, pool, run, max_length=max_length, cache=cache, dtype=dtype
        )
    return teachers, cached


# -- what trains ------------------------------------------------------------------------------


def trainable(model: MultiHeadModel, train: str, top_blocks: int = 2) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` for ``train`` (``all``, ``top``, ``heads``) and return what trains.

    ``top``: the top ``top_blocks`` encoder blocks (found through the family's adapter), the
    pooler, every branch and every head. ``heads``: the heads alone.
    """
    for p in model.parameters():
        p.requires_grad_(train == "all")
    chosen = [*model.heads.parameters()]
    if train == "top":
        adapter = model.adapter
        if adapter.blocks is None:
            raise GuardmergeError(f"heal train: top needs the encoder's blocks: {adapter.no_blocks_reason}")
        blocks = [b for b in blocks_at(model.encoder, adapter.blocks) if any(True for _ in b.parameters())]
        for block in blocks[-top_blocks:]:
            chosen += list(block.parameters())
        chosen += [p for n, p in model.encoder.named_parameters() if adapter.is_pooler(n)]
        chosen += list(model.branches.parameters())
    if train == "all":
        chosen = list(model.parameters())
    for p in chosen:
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def _kept_flags(model: MultiHeadModel) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` and the model's eval mode afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.eval()


# -- batches, loss, agreement -----------------------------------------------------------------


def plan_batches(lengths: Sequence[int], order: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """``order`` cut into batches of at most ``batch_size`` texts whose padded size (texts times
    the longest) stays within ``max_tokens`` (a text longer than the budget goes alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        wider = max(longest, lengths[i])
        if current and (len(current) >= batch_size or wider * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        longest = wider
    if current:
        batches.append(current)
    return batches


@dataclass
class _Run:
    """One heal: the model, the pool, the teachers and the settings."""

    model: MultiHeadModel
    pool: list[str]
    teachers: dict[str, Teacher]
    cfg: HealConfig
    max_length: int
    weights: dict[str, float]
    dtype: torch.dtype | None = None
    device: torch.device = field(init=False)
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.device = model_device(self.model)
        self.lengths = text_lengths(self.model.tokenizer, self.pool, self.max_length)

    def loss(self, index: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """``(weighted mean loss, per-task student logits, attention mask)`` on texts ``index``."""
        model = self.model
        batch = model.encode([self.pool[i] for i in index], self.max_length)
        mask = batch["attention_mask"]
        with autocast(self.device, self.dtype):
            out = model(tasks=list(self.teachers), **batch)
        out = {task: logits.float() for task, logits in out.items()}  # the loss in float32
        total = out[model.tasks[0]].new_zeros(())
        for task, teacher in self.teachers.items():
            kind = model.kind(task)
            target = teacher.target(index, mask, kind.per_token, task).to(out[task])
            total = total + self.weights[task] * kind.distill_loss(out[task], target, mask, self.cfg.temperature)
        return total / sum(self.weights.values()), out, mask

    @torch.no_grad()
    def evaluate(self, index: Sequence[int]) -> dict[str, Any]:
        """Held-out mean agreement with the experts, per task, and the mean loss, on ``index``."""
        self.model.eval()
        agree = dict.fromkeys(self.teachers, 0.0)
        seen = dict.fromkeys(self.teachers, 0)
        loss = 0.0
        by_length = sorted(index, key=self.lengths.__getitem__)
        for start in range(0, len(by_length), self.cfg.batch_size):
            part = by_length[start : start + self.cfg.batch_size]
            value, out, mask = self.loss(part)
            loss += float(value) * len(part)
            for task, teacher in self.teachers.items():
                kind = self.model.kind(task)
                student = out[task][mask.bool()] if kind.per_token else out[task]
                hits = kind.agreement(student, teacher.take(part).float())
                agree[task] += float(hits.double().sum())
                seen[task] += hits.numel()
        tasks = {t: agree[t] / max(seen[t], 1) for t in agree}
        return {"agreement": sum(tasks.values()) / len(tasks), "tasks": tasks, "loss": loss / max(len(index), 1)}


def _better(new: Mapping[str, Any], best: Mapping[str, Any]) -> bool:
    """Higher mean agreement, or equal agreement and a lower loss."""
    return (new["agreement"], -new["loss"]) > (best["agreement"], -best["loss"])


def _split(n: int, cfg: HealConfig) -> tuple[list[int], list[int]]:
    """``(train, held out)`` indices of a pool of ``n`` texts: a seeded draw of ``cfg.holdout``."""
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    held = min(n - 1, max(1, round(cfg.holdout * n))) if cfg.holdout > 0 and n > 1 else 0
    return sorted(order[held:]), sorted(order[:held])


def bucketed_batches(
    lengths: Sequence[int], order: Sequence[int], batch_size: int, max_tokens: int, rng: random.Random
) -> list[list[int]]:
    """One epoch's batches of ``order`` (already shuffled): each window of ``BUCKET_BATCHES``
    batches' texts sorted by length and cut by :func:`plan_batches`, then the batches shuffled
    with ``rng``. Every text once; little padding; the epoch still mixes tasks and lengths."""
    window = batch_size * BUCKET_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lengths.__getitem__)
        batches += plan_batches(lengths, chunk, batch_size, max_tokens)
    rng.shuffle(batches)
    return batches


def _epoch_batches(run: _Run, train: Sequence[int]) -> list[list[int]]:
    """Every step's texts, epoch after epoch, each epoch in a seeded shuffle, length-bucketed."""
    rng = random.Random(run.cfg.seed + 1)
    steps = []
    for _ in range(run.cfg.epochs):
        order = list(train)
        rng.shuffle(order)
        steps += bucketed_batches(run.lengths, order, run.cfg.batch_size, run.cfg.max_tokens, rng)
    return steps


def _train(
    run: _Run, train: Sequence[int], held: Sequence[int], params: list[torch.nn.Parameter], progress: bool
) -> tuple[dict[str, int], dict[str, Any], dict[str, Any], list[dict[str, float]]]:
    """The training loop; returns the report of steps, evaluations and the agreement kept."""
    from tqdm.auto import tqdm

    cfg, model = run.cfg, run.model
    steps = _epoch_batches(run, train)
    per_epoch = max(1, len(steps) // cfg.epochs)
    every = cfg.eval_every or per_epoch
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup * len(steps)), len(steps))
    before = run.evaluate(held or train)
    best, best_step, stale = before, 0, 0
    kept = {id(p): p.detach().clone() for p in params}
    history = [{"step": 0, "agreement": before["agreement"], "loss": before["loss"]}]
    running, done = None, 0
    bar = tqdm(total=len(steps), desc="heal", unit="step", disable=not progress)
    for step, index in enumerate(steps, 1):
        model.train()
        loss, _, _ = run.loss(index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        done = step
        value = float(loss.detach())
        running = value if running is None else 0.9 * running + 0.1 * value
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", agree=f"{best['agreement']:.3f}")
        if not held or (step % every and step != len(steps)):
            continue
        now = run.evaluate(held)
        history.append({"step": step, "agreement": now["agreement"], "loss": now["loss"]})
        bar.set_postfix(loss=f"{running:.4f}", agree=f"{now['agreement']:.3f}")
        if _better(now, best):
            best, best_step, stale = now, step, 0
            kept = {id(p): p.detach().clone() for p in params}
        else:
            stale += 1
            if stale >= cfg.patience:
                log.info("heal: held-out agreement no better for %d checks; stopped at step %d", stale, step)
                break
    bar.close()
    if held:
        with torch.no_grad():
            for p in params:
                p.copy_(kept[id(p)])
    after = run.evaluate(held) if held else run.evaluate(train)
    return {"planned": len(steps), "done": done, "kept": best_step if held else done}, before, after, history


def heal_model(
    model: MultiHeadModel,
    pool: list[str],
    teachers: Mapping[str, Teacher],
    cfg: HealConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Distil every head of ``model`` (in place) from its expert's outputs ``teachers`` on
    ``pool``; return the report (steps, held-out agreement and loss before and after)."""
    if model.tokenizer is None:
        raise GuardmergeError("heal needs the merged model's tokenizer")
    max_length = capped_length(cfg.max_length, model.config, "heal")
    weights = {t: float(cfg.weights.get(t, 1.0)) for t in teachers}
    dtype = heal_dtype(cfg.precision, model_device(model))
    run = _Run(model, pool, dict(teachers), cfg, max_length, weights, dtype)
    train, held = _split(len(pool), cfg)
    with _kept_flags(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        params = trainable(model, cfg.train, cfg.top_blocks)
        steps, before, after, history = _train(run, train, held, params, progress)
    return {
        "steps": steps,
        "trained_parameters": sum(p.numel() for p in params),
        "measured_on": "holdout" if held else "train",
        "agreement_before": before["agreement"],
        "agreement_after": after["agreement"],
        "tasks": {t: {"before": before["tasks"][t], "after": after["tasks"][t]} for t in teachers},
        "loss_before": before["loss"],
        "loss_after": after["loss"],
        "history": history,
        "precision": precision_name(dtype),
        "pool": {"texts": len(pool), "train": len(train), "holdout": len(held)},
    }


def heal_stage(
    job: MergeJob, model: MultiHeadModel, texts: Mapping[str, Sequence[str]], progress: bool = True
) -> dict[str, Any]:
    """The heal stage of an open ``job`` on its merged ``model`` (in place): teachers on the pool
    of every task's texts (cached), then :func:`heal_model`; the report for ``info["heal"]``."""
    cfg = job.heal
    assert cfg is not None, "the job asks for heal"
    started = time.perf_counter()
    pool, sizes = heal_pool(texts, cfg.texts)
    max_length = capped_length(cfg.max_length, model.config, "heal")
    teachers, cached = _teachers(job, pool, cfg, max_length, heal_dtype(cfg.precision, model_device(model)))
    teacher_seconds = time.perf_counter() - started
    report = heal_model(model, pool, teachers, cfg, progress=progress)
    report["pool"]["tasks"] = sizes
    report.update(
        settings=cfg.model_dump(),
        teachers_cached=cached,
        teacher_seconds=teacher_seconds,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "healed on %d pooled texts in %d steps (%.0f s): held-out agreement with the experts %.3f -> %.3f",
        len(pool),
        report["steps"]["done"],
        report["seconds"],
        report["agreement_before"],
        report["agreement_after"],
    )
    if not math.isfinite(report["loss_after"]):
        raise GuardmergeError("heal: the distillation loss is not finite; lower heal.learning_rate")
    return report
