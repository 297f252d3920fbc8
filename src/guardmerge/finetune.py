"""Fine-tune an expert classifier from a base checkpoint (``guardmerge finetune``).

A plain, reproducible recipe: AdamW, linear warm-up and decay, length-bucketed batches (texts of
similar length share a batch, so padding is small and CPU steps are fast), fixed seed. The output
is a stock transformers folder (safetensors), written atomically:

- single-label examples: ``AutoModelForSequenceClassification`` (cross-entropy);
- multi-label examples (``label_sets``): the same class with ``problem_type:
  multi_label_classification`` (a sigmoid and binary cross-entropy per label);
- token examples (``words`` and ``tags``): ``AutoModelForTokenClassification``; each word's tag
  goes to its first sub-token and the rest are masked with -100.

Thresholded heads (multi-label, as the head-kind table says) get two more things, since rare
labels otherwise never reach a sigmoid of 0.5 (GoEmotions: 28 labels, most under 3% positive):

- positive-class weighting: binary cross-entropy with ``pos_weight`` per label
  ``sqrt(neg / pos)`` over the training label sets, clipped to ``[1, pos_weight_max]``
  (:func:`positive_weights`; the square root and the cap keep rare labels from dominating);
- per-label thresholds tuned on the validation examples: each label's threshold is the one of
  :data:`THRESHOLD_GRID` that maximises its F1 there (ties: the one nearest 0.5), and 0.5 for a
  label without validation positives or with F1 0 at every threshold (:func:`tune_thresholds`).
  They are stored in the expert's ``config.json`` (:mod:`guardmerge.models.expert_meta`), where
  ``predict`` and ``eval`` read them.

The fresh classification head may learn faster than the encoder (``head_learning_rate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from guardmerge.data import Examples, TaskData
from guardmerge.errors import DataError, GuardmergeError
from guardmerge.io import atomic_dir
from guardmerge.io.finite import all_finite
from guardmerge.io.formats import SAFETENSORS_FILE, read_config
from guardmerge.io.writer import write_tensors
from guardmerge.models.expert_meta import EXPERT_KEY, expert_section
from guardmerge.models.head_kinds import head_kind

log = logging.getLogger(__name__)


class FinetuneSettings(BaseModel):
    """Training hyperparameters (all recorded in the output's ``guardmerge_finetune.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: float = Field(2.0, gt=0, description="passes over the training set (fractions allowed)")
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(64, ge=8, description="tokens per text (longer texts are truncated)")
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of steps with linear warm-up")
    weight_decay: float = Field(0.01, ge=0)
    max_examples: int | None = Field(None, ge=1, description="cap on training examples")
    seed: int = 0
    head_learning_rate: float | None = Field(
        None, gt=0, description="peak learning rate of the fresh classification head (default: learning_rate)"
    )
    pos_weight_max: float = Field(
        30.0,
        ge=1,
        description="multi-label: cap on each label's positive-class weight sqrt(neg/pos) (1: no weighting)",
    )
    tune_thresholds: bool = Field(
        True, description="multi-label: tune each label's threshold for F1 on the validation examples"
    )


_RECIPE_FIELDS = ("head_learning_rate", "pos_weight_max", "tune_thresholds")
"""Fields added after the first cached experts: left out of the cache key at their defaults for
kinds they do not change, so those experts stay cached."""

THRESHOLD_GRID: np.ndarray = np.round(np.arange(0.02, 0.99, 0.01), 2)
"""The thresholds tried per label (0.02 .. 0.98)."""

FALLBACK_THRESHOLD = 0.5
"""A label's threshold when validation cannot tell (no positives, or F1 0 everywhere)."""


def positive_weights(targets: Sequence[Sequence[float]] | torch.Tensor, cap: float) -> torch.Tensor:
    """Each label's BCE ``pos_weight`` from a multi-hot matrix ``[N, C]``: ``sqrt(neg / pos)``
    clipped to ``[1, cap]`` (a label without positives gets ``cap``; it has no positive terms)."""
    y = torch.as_tensor(targets, dtype=torch.float64)
    if y.ndim != 2 or not len(y):
        raise DataError("positive weights need a non-empty [examples, labels] matrix")
    pos = y.sum(0)
    neg = len(y) - pos
    weight = torch.where(pos > 0, (neg / pos.clamp(min=1)).sqrt(), torch.full_like(pos, float(cap)))
    return weight.clamp(1.0, float(cap)).float()


def tune_thresholds(
    probs: np.ndarray, gold: np.ndarray, grid: np.ndarray = THRESHOLD_GRID
) -> tuple[list[float], list[float]]:
    """``(thresholds, f1s)``: per label (columns of ``probs`` and ``gold``, ``[N, C]``), the grid
    value maximising F1 of ``probs >= t`` against ``gold`` (ties: nearest 0.5) and that F1;
    :data:`FALLBACK_THRESHOLD` (and its F1) for a label without positives or with F1 0 everywhere."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(gold).astype(bool)
    if p.shape != y.shape or p.ndim != 2:
        raise DataError(f"threshold tuning: probabilities {p.shape} and labels {y.shape} must both be [N, C]")
    cuts = np.asarray(grid, dtype=np.float64)
    thresholds, f1s = [], []
    for c in range(p.shape[1]):
        pred = p[:, c, None] >= cuts[None, :]
        tp = (pred & y[:, c, None]).sum(0)
        fp = pred.sum(0) - tp
        fn = int(y[:, c].sum()) - tp
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        if not y[:, c].any() or f1.max() <= 0:
            at = p[:, c] >= FALLBACK_THRESHOLD
            hits = int((at & y[:, c]).sum())
            denom = int(at.sum()) + int(y[:, c].sum())
            thresholds.append(FALLBACK_THRESHOLD)
            f1s.append(2 * hits / denom if denom else 0.0)
            continue
        best = np.flatnonzero(f1 == f1.max())
        pick = best[np.argmin(np.abs(cuts[best] - FALLBACK_THRESHOLD))]
        thresholds.append(float(cuts[pick]))
        f1s.append(float(f1[pick]))
    return thresholds, f1s


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort by length inside windows of 50 batches: little padding, still random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def finetune(
    base: str | Path,
    train: Examples,
    labels: Sequence[str],
    out: str | Path,
    settings: FinetuneSettings | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    validation: Examples | None = None,
) -> Path:
    """Fine-tune ``base`` on ``train`` (a sequence, multi-label or token classifier, as the
    examples' :attr:`~guardmerge.data.Examples.kind` says) and save it to ``out``.

    Args:
        base: base checkpoint folder (a headless encoder or a masked-LM is fine).
        train: labelled examples; labels (or label sets, or tags) index into ``labels``.
        labels: label names, in index order.
        out: output folder (refused if it exists, unless ``force``).
        allow_pickle: accept a base with only ``pytorch_model.bin`` (pickle) weights.
        validation: labelled examples of the same kind for a thresholded head's per-label
            thresholds (``settings.tune_thresholds``); without them every label keeps 0.5.
    """
    from guardmerge.models.adapters import capped_length

    s = settings or FinetuneSettings()
    if not train.labelled:
        raise DataError("fine-tuning needs labelled examples")
    train = train.head(s.max_examples)
    torch.manual_seed(s.seed)
    kind = head_kind(train.kind)
    if validation is not None and validation.kind != train.kind:
        raise DataError(f"validation examples are {validation.kind}, the training ones {train.kind}")
    model, tok, head = _start(base, train.kind, labels, allow_pickle)
    length = capped_length(s.max_length, model.config.to_dict(), "fine-tune")
    columns, targets = _encode(tok, train, len(labels), length)
    weights = positive_weights(targets, s.pos_weight_max) if kind.thresholded else None
    if weights is not None:
        log.info(
            "positive-class weights (sqrt(neg/pos), clipped to [1, %g]): %s",
            s.pos_weight_max,
            ", ".join(f"{n}={w:.1f}" for n, w in zip(labels, weights.tolist(), strict=True)),
        )
    _train(model, tok, columns, targets, train.kind, s, str(out), progress, head, weights)
    model.eval()
    tuned: dict[str, Any] = {}
    if kind.thresholded and s.tune_thresholds:
        if validation is None or not validation.labelled or not len(validation.texts):
            log.warning("fine-tuning %s: no validation examples, so every label keeps threshold %g", out, 0.5)
        else:
            cuts, f1s = _tuned_thresholds(model, tok, validation, len(labels), length, s.batch_size, progress)
            model.config.update({EXPERT_KEY: expert_section(dict(zip(labels, cuts, strict=True)))})
            tuned = {
                "validation_examples": len(validation.texts),
                "validation_macro_f1_tuned": round(float(np.mean(f1s)), 4),
                "validation_f1": {n: round(f, 4) for n, f in zip(labels, f1s, strict=True)},
            }
            log.info("thresholds tuned on %d validation examples: macro-F1 %.3f", len(validation.texts), np.mean(f1s))
    bad = [n for n, p in model.state_dict().items() if not all_finite(p)]
    if bad:
        raise GuardmergeError(f"fine-tuning {out}: tensor '{bad[0]}' holds NaN or Inf values; nothing was written")
    with atomic_dir(out, force=force) as tmp:  # guardmerge's own writer: a full disk is an error naming OUT
        write_tensors(tmp, {k: v.detach().contiguous() for k, v in model.state_dict().items()})
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        record = {**s.model_dump(mode="json"), **tuned}
        (tmp / "guardmerge_finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    return Path(out)


def _start(base: str | Path, kind: str, labels: Sequence[str], allow_pickle: bool) -> tuple[Any, Any, tuple[str, ...]]:
    """The stock classifier to train (the base's weights; a fresh head, and a fresh pooler where
    the base has none), its tokenizer and the head's parameter-name prefixes (model names)."""
    from guardmerge.io.checkpoint import resolve
    from guardmerge.models.adapters import get_adapter
    from guardmerge.models.folder import load_tokenizer
    from guardmerge.models.stock import stock_model

    folder = resolve(base)
    config = read_config(folder)
    adapter = get_adapter(str(config["model_type"]), where=str(folder))
    tok = load_tokenizer(folder, required=True)
    fresh = (*adapter.head_prefixes, *(p for p in (adapter.pooler,) if p), *adapter.token_head_layers)
    model = stock_model(
        folder,
        token=head_kind(kind).per_token,
        labels=labels,
        multi_label=head_kind(kind).stock_problem_type is not None,
        fresh=tuple(f if f.endswith(".") else f + "." for f in fresh),
        allow_pickle=allow_pickle,
        where=f"base {base}",
    )
    heads = (*adapter.head_prefixes, *adapter.token_head_layers)
    return model, tok, tuple(f if f.endswith(".") else f + "." for f in heads)


def _train(
    model: Any,
    tok: Any,
    columns: dict[str, Any],
    targets: list[Any],
    kind: str,
    s: FinetuneSettings,
    out: str,
    progress: bool,
    head: tuple[str, ...] = (),
    pos_weight: torch.Tensor | None = None,
) -> None:
    """AdamW with linear warm-up and decay over length-bucketed batches (the parameters under
    the ``head`` prefixes at ``s.head_learning_rate``); binary cross-entropy with ``pos_weight``
    where given; a non-finite loss stops the run with an error (nothing is written)."""
    from transformers import get_linear_schedule_with_warmup

    rng = random.Random(s.seed)
    ids = columns["input_ids"]
    total = max(1, math.ceil(math.ceil(len(ids) / s.batch_size) * s.epochs))
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    head_lr = s.head_learning_rate or s.learning_rate
    groups = []
    for is_head in (False, True):
        for decay in (True, False):
            params = [
                p for n, p in model.named_parameters() if _in_head(n, head) == is_head and n.endswith(no_decay) != decay
            ]
            if params:
                lr = head_lr if is_head else s.learning_rate
                groups.append({"params": params, "weight_decay": s.weight_decay if decay else 0.0, "lr": lr})
    opt = torch.optim.AdamW(groups, lr=s.learning_rate)
    sched = get_linear_schedule_with_warmup(opt, int(s.warmup * total), total)
    model.train()
    bar = tqdm(total=total, desc=f"fine-tune {Path(out).name}", unit="step", disable=not progress)
    step, started, loss_ema = 0, time.perf_counter(), None
    while step < total:
        for batch_idx in _batches([len(x) for x in ids], s.batch_size, rng):
            if step >= total:
                break
            feats = tok.pad({k: [v[i] for i in batch_idx] for k, v in columns.items()}, return_tensors="pt")
            gold = _targets(targets, batch_idx, kind)
            if pos_weight is None:
                loss = model(**feats, labels=gold).loss
            else:
                logits = model(**feats).logits
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, gold.to(logits.dtype), pos_weight=pos_weight.to(logits.dtype)
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise GuardmergeError(
                    f"fine-tuning {out} diverged at step {step} (the loss is {value}); nothing was written: "
                    "lower the learning rate (--lr)"
                )
            loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
            bar.set_postfix(loss=f"{loss_ema:.3f}")
            bar.update()
    bar.close()
    log.info("fine-tuned %s: %d steps in %.0f s", out, total, time.perf_counter() - started)


def _in_head(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the model parameter ``name`` (``classifier.weight``; ``bert.pooler...`` is not)
    belongs to the classification head."""
    return name.startswith(prefixes)


def _tuned_thresholds(
    model: Any, tok: Any, validation: Examples, n_labels: int, max_length: int, batch_size: int, progress: bool
) -> tuple[list[float], list[float]]:
    """:func:`tune_thresholds` of the model's probabilities on the validation examples."""
    kind = head_kind(validation.kind)
    columns, gold = _encode(tok, validation, n_labels, max_length)
    ids = columns["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    probs = np.zeros((len(ids), n_labels))
    step = max(batch_size, 64)
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), step), desc="tune thresholds", unit="batch", disable=not progress):
            rows = order[start : start + step]
            feats = tok.pad({k: [v[i] for i in rows] for k, v in columns.items()}, return_tensors="pt")
            probs[rows] = kind.activation(model(**feats).logits.double().numpy())
    return tune_thresholds(probs, np.asarray(gold, dtype=bool))


def _encode(tok: Any, train: Examples, n_labels: int, max_length: int) -> tuple[dict[str, Any], list[Any]]:
    """Tokenised columns and one training target per example: a label index, a multi-hot row
    (multi-label), or a per-sub-token tag list (first sub-token of each word, the rest -100)."""
    used = train.labels or [i for row in (train.label_sets or train.tags or []) for i in row]
    bad = [i for i in used if not 0 <= i < n_labels]
    if bad:
        raise DataError(f"label index {bad[0]} outside the {n_labels} label names given (0..{n_labels - 1})")
    if head_kind(train.kind).per_token:
        if not getattr(tok, "is_fast", False):
            raise DataError("token-classification fine-tuning needs a fast tokenizer (word ids)")
        enc = tok(train.words, is_split_into_words=True, truncation=True, max_length=max_length)
        tags = []
        for row, word_tags in enumerate(train.tags or []):
            previous, out = None, []
            for word in enc.word_ids(row):
                out.append(-100 if word is None or word == previous else word_tags[word])
                previous = word
            tags.append(out)
        return dict(enc.items()), tags
    enc = tok(train.texts, truncation=True, max_length=max_length)
    if head_kind(train.kind).gold == "label_sets":
        hot = [[float(i in set(s)) for i in range(n_labels)] for s in train.label_sets or []]
        return dict(enc.items()), hot
    return dict(enc.items()), list(train.labels or [])


def _targets(targets: list[Any], batch: list[int], kind: str) -> torch.Tensor:
    """The batch's ``labels`` tensor (token tags padded with -100 to the batch's length)."""
    if not head_kind(kind).per_token:
        return torch.tensor([targets[i] for i in batch])
    width = max(len(targets[i]) for i in batch)
    return torch.tensor([targets[i] + [-100] * (width - len(targets[i])) for i in batch])


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.read_bytes() if isinstance(p, Path) and p.is_file() else str(p).encode())
    return h.hexdigest()[:12]


def finetune_cached(
    base: Path, task: TaskData, settings: FinetuneSettings, cache: Path, *, progress: bool = True
) -> Path:
    """Fine-tune the expert of ``task`` into ``cache``, or reuse it when the base's config and
    size, the training file, the labels and the settings are unchanged."""
    weights = base / SAFETENSORS_FILE
    size = weights.stat().st_size if weights.is_file() else 0
    key = _digest(base / "config.json", size, task.folder / "train.jsonl", task.labels, _settings_key(settings, task))
    out = Path(cache) / f"{task.name}-{key}"
    if (out / "config.json").is_file():
        log.info("expert %s: cached at %s", task.name, out)
        return out
    log.info("expert %s: fine-tuning from %s (%s)", task.name, base, settings)
    tuning = head_kind(task.type).thresholded and settings.tune_thresholds
    validation = task.split("validation") if tuning and (task.folder / "validation.jsonl").is_file() else None
    return finetune(base, task.split("train"), task.labels, out, settings, progress=progress, validation=validation)


def _settings_key(settings: FinetuneSettings, task: TaskData) -> str:
    """The settings' part of a cached expert's key: :data:`_RECIPE_FIELDS` at their defaults are
    left out for kinds they do not change (the cached single-label and token experts stay valid);
    a thresholded kind's key holds them all, and its validation file (its thresholds' source)."""
    if head_kind(task.type).thresholded:
        valid = task.folder / "validation.jsonl"
        return settings.model_dump_json() + (_digest(valid) if valid.is_file() else "")
    defaults = FinetuneSettings()
    same = {f for f in _RECIPE_FIELDS if getattr(settings, f) == getattr(defaults, f)}
    return settings.model_dump_json(exclude=same)


def training_data(
    data: Path,
    task_type: str,
    labels: str | None,
    text_field: str = "text",
    label_field: str = "label",
    validation: Path | None = None,
) -> tuple[Examples, list[str], Examples | None]:
    """The training examples, label names and validation examples (None: none) of ``guardmerge
    finetune DATA``: a task folder (``train.jsonl`` + ``labels.json``, and ``validation.jsonl``
    where present) or a JSONL/CSV file of ``task_type`` with ``labels`` (comma-separated names);
    ``validation`` (a file of the same shape) overrides the folder's."""
    from guardmerge.data import load_task, read_examples, read_multi_label_examples, read_token_examples

    if data.is_dir():
        task = load_task(data)
        task_type = task.type
    readers = {
        "single_label": lambda f: read_examples(f, text_field=text_field, label_field=label_field),
        "multi_label": read_multi_label_examples,
        "token": read_token_examples,
    }
    if task_type not in readers:
        raise GuardmergeError(f"--type must be one of {', '.join(readers)}, got '{task_type}'")
    valid = readers[task_type](validation) if validation is not None else None
    if data.is_dir():
        if valid is None and (task.folder / "validation.jsonl").is_file():
            valid = task.split("validation")
        return task.split("train"), list(task.labels), valid
    train = readers[task_type](data)
    if not labels:
        raise GuardmergeError("--labels is required when DATA is a file (e.g. --labels benign,injection)")
    return train, [x.strip() for x in labels.split(",")], valid
