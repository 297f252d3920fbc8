"""Fine-tune an expert classifier from a base checkpoint (``guardmerge finetune``).

A plain, reproducible recipe: AdamW, linear warm-up and decay, length-bucketed batches (texts of
similar length share a batch, so padding is small and CPU steps are fast), fixed seed. The output
is a stock transformers folder (safetensors), written atomically:

- single-label examples: ``AutoModelForSequenceClassification`` (cross-entropy);
- multi-label examples (``label_sets``): the same class with ``problem_type:
  multi_label_classification`` (a sigmoid and binary cross-entropy per label);
- token examples (``words`` and ``tags``): ``AutoModelForTokenClassification``; each word's tag
  goes to its first sub-token and the rest are masked with -100.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from guardmerge.data import Examples, TaskData
from guardmerge.errors import DataError, GuardmergeError
from guardmerge.io import atomic_dir
from guardmerge.io.formats import SAFETENSORS_FILE, read_config
from guardmerge.io.writer import write_tensors
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
) -> Path:
    """Fine-tune ``base`` on ``train`` (a sequence, multi-label or token classifier, as the
    examples' :attr:`~guardmerge.data.Examples.kind` says) and save it to ``out``.

    Args:
        base: base checkpoint folder (a headless encoder or a masked-LM is fine).
        train: labelled examples; labels (or label sets, or tags) index into ``labels``.
        labels: label names, in index order.
        out: output folder (refused if it exists, unless ``force``).
        allow_pickle: accept a base with only ``pytorch_model.bin`` (pickle) weights.
    """
    from guardmerge.models.adapters import capped_length

    s = settings or FinetuneSettings()
    if not train.labelled:
        raise DataError("fine-tuning needs labelled examples")
    train = train.head(s.max_examples)
    torch.manual_seed(s.seed)
    model, tok = _start(base, train.kind, labels, allow_pickle)
    length = capped_length(s.max_length, model.config.to_dict(), "fine-tune")
    columns, targets = _encode(tok, train, len(labels), length)
    _train(model, tok, columns, targets, train.kind, s, str(out), progress)
    model.eval()
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise GuardmergeError(f"fine-tuning {out}: tensor '{bad[0]}' holds NaN or Inf values; nothing was written")
    with atomic_dir(out, force=force) as tmp:  # guardmerge's own writer: a full disk is an error naming OUT
        write_tensors(tmp, {k: v.detach().contiguous() for k, v in model.state_dict().items()})
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "guardmerge_finetune.json").write_text(s.model_dump_json(indent=2) + "\n")
    return Path(out)


def _start(base: str | Path, kind: str, labels: Sequence[str], allow_pickle: bool) -> tuple[Any, Any]:
    """The stock classifier to train (the base's weights; a fresh head, and a fresh pooler where
    the base has none) and its tokenizer."""
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
        multi_label=kind == "multi_label",
        fresh=tuple(f if f.endswith(".") else f + "." for f in fresh),
        allow_pickle=allow_pickle,
        where=f"base {base}",
    )
    return model, tok


def _train(
    model: Any,
    tok: Any,
    columns: dict[str, Any],
    targets: list[Any],
    kind: str,
    s: FinetuneSettings,
    out: str,
    progress: bool,
) -> None:
    """AdamW with linear warm-up and decay over length-bucketed batches; a non-finite loss stops
    the run with an error (nothing is written)."""
    from transformers import get_linear_schedule_with_warmup

    rng = random.Random(s.seed)
    ids = columns["input_ids"]
    total = max(1, math.ceil(math.ceil(len(ids) / s.batch_size) * s.epochs))
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": s.weight_decay,
        },
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
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
            loss = model(**feats, labels=_targets(targets, batch_idx, kind)).loss
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
    if train.kind == "multi_label":
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
    key = _digest(base / "config.json", size, task.folder / "train.jsonl", task.labels, settings.model_dump_json())
    out = Path(cache) / f"{task.name}-{key}"
    if (out / "config.json").is_file():
        log.info("expert %s: cached at %s", task.name, out)
        return out
    log.info("expert %s: fine-tuning from %s (%s)", task.name, base, settings)
    return finetune(base, task.split("train"), task.labels, out, settings, progress=progress)


def training_data(
    data: Path, task_type: str, labels: str | None, text_field: str = "text", label_field: str = "label"
) -> tuple[Examples, list[str]]:
    """The training examples and label names of ``guardmerge finetune DATA``: a task folder
    (``train.jsonl`` + ``labels.json``) or a JSONL/CSV file of ``task_type`` with ``labels``
    (comma-separated names)."""
    from guardmerge.data import load_task, read_examples, read_multi_label_examples, read_token_examples

    if data.is_dir():
        task = load_task(data)
        return task.split("train"), list(task.labels)
    readers = {
        "single_label": lambda: read_examples(data, text_field=text_field, label_field=label_field),
        "multi_label": lambda: read_multi_label_examples(data),
        "token": lambda: read_token_examples(data),
    }
    if task_type not in readers:
        raise GuardmergeError(f"--type must be one of {', '.join(readers)}, got '{task_type}'")
    train = readers[task_type]()
    if not labels:
        raise GuardmergeError("--labels is required when DATA is a file (e.g. --labels benign,injection)")
    return train, [x.strip() for x in labels.split(",")]
