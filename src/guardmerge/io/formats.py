"""File names and formats of a model folder, in one place, and the one weight-file finder.

Every reader of a model folder (merge, statistics, ``load()``, head alignment, layer-wise stages,
fine-tuning, export, the LLM Guard scanners) finds its weights with :func:`weight_files` and
reads its ``config.json`` with :func:`read_config`, so a rule added here holds everywhere:

- shard indexes may only name files inside the folder;
- a weight file (or shard) that is a symbolic link must resolve inside the folder, or, for a
  Hugging Face hub snapshot (``.../snapshots/<revision>/``), inside that cache's ``blobs/``;
- pickle checkpoints are refused unless the caller allows them;
- a ``config.json`` must be a JSON object with a ``model_type``, without code hints
  (``auto_map``: nothing of a model folder is ever imported or run) and without a
  ``quantization_config`` (guardmerge reads floating-point weights only).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

from guardmerge.errors import CheckpointError, GuardmergeError

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
MERGE_CONFIG_FILE = "merge_config.yaml"
MODEL_CARD_FILE = "README.md"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

TOKENIZER_VOCAB_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spm.model",  # DeBERTa-v2/v3
    "spiece.model",  # ALBERT
    "sentencepiece.bpe.model",  # XLM-R
    "tokenizer.model",
)
"""Files that hold a tokenizer's vocabulary: any one of them means the folder carries a tokenizer,
and identical files mean an identical vocabulary."""

TOKENIZER_FILES = (
    *TOKENIZER_VOCAB_FILES,
    TOKENIZER_CONFIG_FILE,
    "special_tokens_map.json",
    "added_tokens.json",
)
"""Every file of a saved tokenizer (copied as it is into a merged folder)."""

CODE_HINT_KEYS = ("auto_map", "custom_pipelines")
"""Config fields that point transformers at code shipped with a model: refused everywhere."""

HF_BLOBS = "blobs"
HF_SNAPSHOTS = "snapshots"


def shard_name(index: int, count: int) -> str:
    """The standard name of shard ``index`` (0-based) of ``count``: ``model-00001-of-00003.safetensors``."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def clip(text: object, limit: int = 80) -> str:
    """``text`` for an error message: printable and bounded (never a file's raw bytes)."""
    s = repr(str(text))[1:-1]
    return s if len(s) <= limit else s[: limit - 3] + "..."


def short_path(path: PathLike, limit: int = 120) -> str:
    """A path for an error message, shortened in the middle when long."""
    text = str(path)
    return text if len(text) <= limit else text[: limit // 2] + "..." + text[-limit // 2 :]


def read_json(
    path: PathLike, *, error: type[GuardmergeError] = GuardmergeError, what: str = "JSON", max_bytes: int | None = None
) -> Any:
    """``path`` parsed as JSON, or ``error`` naming the file (larger than ``max_bytes``, binary,
    too deeply nested, invalid, a number too large to read)."""
    p = Path(path)
    try:
        if max_bytes is not None and p.stat().st_size > max_bytes:
            raise error(f"{short_path(p)} is larger than {max_bytes >> 20} MiB: not {what}")
        raw = p.read_bytes()
    except OSError as exc:
        raise error(f"{short_path(p)}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{short_path(p)} is not UTF-8 text (binary file? bad byte at offset {exc.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{short_path(p)} is not valid {what}: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers beyond Python's digit limit
        raise error(f"{short_path(p)} is not valid {what}: {clip(exc, 200)}") from None


def read_config(folder: PathLike, *, where: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a model folder, checked (see the module docstring).

    Raises:
        CheckpointError: no file, not a JSON object, no ``model_type``, code hints or a
            ``quantization_config``; naming the file and the field.
    """
    cfg = Path(folder) / CONFIG_FILE
    if not cfg.is_file():
        raise CheckpointError(f"{short_path(cfg)} is missing: not a Hugging Face model folder")
    data = read_json(cfg, error=CheckpointError, what="model config")
    at = where or short_path(cfg)
    if not isinstance(data, dict):
        raise CheckpointError(f"{at}: config.json is not a JSON object")
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        raise CheckpointError(f"{at}: config.json has no 'model_type' field")
    hints = [k for k in CODE_HINT_KEYS if data.get(k)]
    if hints:
        raise CheckpointError(
            f"{at}: config.json field '{hints[0]}' points at code shipped with the model; guardmerge never "
            "imports or runs a model folder's code: use a model of a supported stock architecture"
        )
    if data.get("quantization_config"):
        raise CheckpointError(
            f"{at}: a quantised checkpoint (quantization_config); guardmerge reads floating-point weights "
            "only: use the unquantised model"
        )
    return data


def check_tokenizer_config(folder: PathLike) -> None:
    """Refuse a ``tokenizer_config.json`` that points at code shipped with the model (``auto_map``)."""
    cfg = Path(folder) / TOKENIZER_CONFIG_FILE
    if not cfg.is_file():
        return
    data = read_json(cfg, error=CheckpointError, what="tokenizer config")
    if isinstance(data, dict) and any(data.get(k) for k in CODE_HINT_KEYS):
        raise CheckpointError(
            f"{short_path(cfg)}: the tokenizer points at code shipped with the model (auto_map); "
            "guardmerge never imports or runs a model folder's code"
        )


def allowed_roots(folder: PathLike) -> list[Path]:
    """Where the files of ``folder`` may resolve to: the folder itself, and for a hub snapshot
    (``<cache>/models--org--name/snapshots/<revision>``) that cache entry's ``blobs/``."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    lexical = Path(os.path.abspath(folder))
    for candidate in {lexical, real}:
        if candidate.parent.name == HF_SNAPSHOTS:
            roots.append(Path(os.path.realpath(candidate.parent.parent / HF_BLOBS)))
    return roots


def check_inside(folder: PathLike, file: PathLike, what: str = "weight file") -> Path:
    """``file`` resolved, refused unless it lies inside ``folder``'s :func:`allowed_roots`.

    Nothing of a file that resolves elsewhere is opened or quoted.
    """
    real = Path(os.path.realpath(file))
    for root in allowed_roots(folder):
        if real == root or root in real.parents:
            return real
    raise CheckpointError(
        f"{short_path(file)}: the {what} is a link that resolves outside the model folder {short_path(folder)}; refused"
    )


def index_shards(folder: Path, index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each checked to lie inside ``folder``.

    Raises:
        CheckpointError: an invalid index, a shard path outside the folder (``../``, absolute, a
            link that leaves it), or a missing shard.
    """
    check_inside(folder, index, "shard index")
    data = read_json(index, error=CheckpointError, what="shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{short_path(index)} is not a valid shard index: no 'weight_map' object")
    shards = set()
    for name in weight_map.values():
        if not isinstance(name, str) or not name or "\0" in name:
            raise CheckpointError(f"{short_path(index)}: a shard entry is not a file name")
        rel = os.path.normpath(name.replace("\\", "/"))
        if os.path.isabs(rel) or Path(name).is_absolute() or rel == ".." or rel.startswith("../") or rel == ".":
            raise CheckpointError(
                f"{short_path(index)}: shard '{clip(name)}' lies outside the model folder {short_path(folder)}; refused"
            )
        shards.add(folder / rel)
    missing = [s for s in sorted(shards) if not s.is_file()]
    if missing:
        raise CheckpointError(f"{short_path(index)} names shard {clip(missing[0].name)}, which is missing")
    for shard in shards:
        check_inside(folder, shard, "shard")
    return sorted(shards)


def weight_files(folder: PathLike, *, allow_pickle: bool = False) -> tuple[list[Path], bool]:
    """The weight files of a model folder and whether they are pickles: the one finder every
    reader goes through.

    Raises:
        CheckpointError: no weights, a bad shard index, a weight file that resolves outside the
            folder, or pickle weights without ``allow_pickle``.
    """
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        return index_shards(folder, index), False
    single = folder / SAFETENSORS_FILE
    if single.is_file() or single.is_symlink():
        check_inside(folder, single)
        return [single], False
    pickles = [p for p in (folder / PICKLE_FILE, folder / PICKLE_INDEX) if p.is_file()]
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{short_path(pickles[0])} is a pickle checkpoint, which can run arbitrary code when "
                "loaded; guardmerge refuses it by default. Convert it to safetensors, or pass "
                "--allow-pickle (allow_pickle: true in the config) if you trust its source."
            )
        if pickles[0].name == PICKLE_INDEX:
            return index_shards(folder, pickles[0]), True
        check_inside(folder, pickles[0])
        return [pickles[0]], True
    raise CheckpointError(f"no weights in {short_path(folder)}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def has_tokenizer(folder: PathLike) -> bool:
    """Whether ``folder`` carries a tokenizer (one of :data:`TOKENIZER_VOCAB_FILES`)."""
    return any((Path(folder) / f).is_file() for f in TOKENIZER_VOCAB_FILES)


def input_files(paths: Iterable[PathLike | None]) -> list[Path]:
    """Every path an input reads, symbolic links resolved: each input itself, and for a folder
    every file directly in it (config, weights, shards, tokenizer: a hub snapshot's files are
    links into the cache's ``blobs/``, which an output must not touch either)."""
    out: list[Path] = []
    for item in paths:
        if item is None or str(item) == "":
            continue
        p = Path(item)
        try:
            if not p.exists():
                continue  # a hub id, or nothing on disk that could be harmed
            out.append(Path(os.path.realpath(p)))
            if p.is_dir():
                with os.scandir(p) as entries:
                    out += [Path(os.path.realpath(e.path)) for e in entries if e.is_file()]
        except OSError:
            continue
    return out
