"""Reading and writing model folders: a merged folder (``model.safetensors`` with encoder tensors
under their canonical names, ``heads.<task>.*`` and ``branches.<task>.*``; ``config.json``, the
encoder's transformers config plus a ``guardmerge`` section describing the heads; the tokenizer)
and a stock classifier folder read as a one-head model.

The functions that build a model take its class (``cls``): :class:`MultiHeadModel`'s
``save_pretrained``, ``from_pretrained`` and ``from_classifier`` call them (a merge's result calls
:func:`model_from_tensors`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from guardmerge.errors import CheckpointError
from guardmerge.io import atomic_dir
from guardmerge.io.formats import CONFIG_FILE, check_tokenizer_config, clip, read_config
from guardmerge.models.adapters import ArchitectureAdapter, get_adapter
from guardmerge.models.branches import BRANCH_PREFIX, Branch, build_branch, cut_trunk
from guardmerge.models.expert_meta import stored_thresholds
from guardmerge.models.head_kinds import head_kind
from guardmerge.models.heads import HEAD_PREFIX, HeadSpec, head_from_tensors, head_specs, stock_head_tensors
from guardmerge.models.modules import BUFFERS, blocks_at, build_encoder, has_pooler

if TYPE_CHECKING:
    from torch import nn

    from guardmerge.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)

MultiHeadModel = Any
"""A :class:`~guardmerge.models.multihead.MultiHeadModel`, typed loosely here: that module imports
this one (its folder methods call these functions), and this one never imports it back."""
M = TypeVar("M", bound=torch.nn.Module)


def save_folder(model: MultiHeadModel, path: str | Path, *, force: bool = False) -> Path:
    """Write ``model``'s folder atomically (temporary folder, then rename)."""
    with atomic_dir(path, force=force) as tmp:
        cfg = folder_config(model.config, {t: model.spec(t) for t in model.tasks}, model.info)
        write_model_folder(tmp, model.state_tensors(), cfg, model.tokenizer)
    return Path(path)


def load_folder(cls: Callable[..., M], path: str | Path, *, device: str = "cpu") -> M:
    """A ``cls`` model from a folder written by ``save_pretrained`` or ``guardmerge merge``."""
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
    model = model_from_tensors(cls, config, specs, tensors, info, load_tokenizer(folder), where=str(folder))
    return model.to(device)


def model_from_tensors(
    cls: Callable[..., M],
    config: Mapping[str, Any],
    heads: Mapping[str, HeadSpec],
    tensors: Mapping[str, torch.Tensor],
    info: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    *,
    strict: bool = True,
    where: str = "tensors",
) -> M:
    """A ``cls`` model from its saved tensors (encoder, ``heads.*``, ``branches.*``).

    ``branches.*`` tensors make a branched model at depth ``info["share_layers"]`` (one ``K``, or
    task -> ``K_t``); ``strict`` checks that the encoder tensors match the config (named after ``where``).
    """
    info = dict(info or {})
    head_mods = {task: head_from_tensors(task, spec, tensors) for task, spec in heads.items()}
    enc_state = {k: v for k, v in tensors.items() if not k.startswith((HEAD_PREFIX, BRANCH_PREFIX))}
    adapter = get_adapter(str(config["model_type"]))
    encoder = build_encoder(config, has_pooler(adapter, enc_state), empty=True)
    branched = any(k.startswith(BRANCH_PREFIX) for k in tensors)
    layers = len(blocks_at(encoder, adapter.blocks)) if adapter.blocks else 0
    depths = _depths(info.get("share_layers"), heads, layers, where) if branched else {}
    top = max(depths.values(), default=layers)
    if top < layers:
        cut_trunk(encoder, adapter, top)
        if top == 0 and adapter.embeddings_project:  # each branch owns it; the trunk's output is unused
            lead = adapter.embeddings_project + "."
            own = encoder.state_dict()
            enc_state.update({k: torch.zeros_like(v) for k, v in own.items() if k.startswith(lead)})
    load_encoder(encoder, enc_state, strict, where)
    branches = _branches(encoder, adapter, heads, tensors, depths, layers, where) if branched else {}
    return cls(encoder, head_mods, config, info=info, tokenizer=tokenizer, branches=branches)


def _depths(given: Any, heads: Mapping[str, HeadSpec], layers: int, where: str) -> dict[str, int]:
    """Task -> ``K_t`` from ``guardmerge.share_layers`` (a uniform ``K`` below ``layers``, or
    every head's depth in ``0..layers``, one at least below it)."""
    if isinstance(given, int) and not isinstance(given, bool) and 0 <= given < layers:
        return dict.fromkeys(heads, given)
    if isinstance(given, dict) and set(given) == set(heads):
        depths = {t: given[t] for t in heads}
        valid = all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= layers for k in depths.values())
        if valid and min(depths.values()) < layers:
            return depths
    raise CheckpointError(
        f"{where}: branch tensors ('{BRANCH_PREFIX}*') need guardmerge.share_layers "
        f"in 0..{layers - 1}, or every head's depth in 0..{layers} (one below {layers}), got {clip(repr(given))}"
    )


def _branches(
    trunk: nn.Module,
    adapter: ArchitectureAdapter,
    heads: Mapping[str, HeadSpec],
    tensors: Mapping[str, torch.Tensor],
    depths: Mapping[str, int],
    layers: int,
    where: str,
) -> dict[str, Branch]:
    """The :class:`Branch` of each head sharing fewer than ``layers`` blocks, from its
    ``branches.<task>.*`` tensors (those of any other task are refused)."""
    branches: dict[str, Branch] = {}
    for task in heads:
        if depths[task] >= layers:
            continue
        lead = f"{BRANCH_PREFIX}{task}."
        own = {k[len(lead) :]: v for k, v in tensors.items() if k.startswith(lead)}
        if not own:
            raise CheckpointError(f"{where}: head '{task}' has no branch tensors ('{lead}*')")
        branches[task] = build_branch(trunk, adapter, depths[task], layers, own, f"{where}, branch '{task}'")
    stray = sorted(
        {k[len(BRANCH_PREFIX) :].split(".", 1)[0] for k in tensors if k.startswith(BRANCH_PREFIX)} - set(branches)
    )
    if stray:
        raise CheckpointError(f"{where}: branch tensors of tasks with no head or no branch: {', '.join(stray)}")
    return branches


def model_from_classifier(
    cls: Callable[..., M],
    path: str | Path | Checkpoint,
    task: str | None = None,
    *,
    allow_pickle: bool = False,
    fill: Mapping[str, torch.Tensor] | None = None,
) -> M:
    """Wrap a stock ``*ForSequenceClassification`` (single- or multi-label) or
    ``*ForTokenClassification`` folder (or hub id, or a merge job's open checkpoint, read
    again and not reopened) as a one-head ``cls`` model.

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
        labels = ck.id2label()
        tuned = (
            stored_thresholds(ck.config, f"{ck.source}/config.json", labels) if head_kind(problem).thresholded else {}
        )
        spec = HeadSpec.from_layout(labels, layout, problem, thresholds=tuned or None)
        missing = [n for n in layout.tensor_names() if n not in ck]
        if missing:
            raise CheckpointError(
                f"{ck.source} has no classification head ('{missing[0]}' missing; expected a {ad.stock_class(problem)})"
            )
        head = head_from_tensors(name, spec, stock_head_tensors(name, layout, ck.get))
        dropped = ("id2label", "label2id", "architectures", "problem_type")
        config = {k: v for k, v in ck.config.items() if k not in dropped}
        encoder = build_encoder(config, has_pooler(ad, enc_state), empty=True)
        load_encoder(encoder, enc_state, True, ck.where)
        return cls(encoder, {name: head}, config, info={"source": ck.source}, tokenizer=load_tokenizer(ck.path))


def load_encoder(encoder: nn.Module, state: Mapping[str, torch.Tensor], strict: bool, where: str) -> None:
    """Load ``state`` into an encoder built without initialisation: a missing tensor is always an
    error (it would hold uninitialised memory); an unexpected one only when ``strict``."""
    missing, unexpected = encoder.load_state_dict(dict(state), strict=False)
    missing = [m for m in missing if not m.endswith(BUFFERS)]
    unexpected = [u for u in unexpected if not u.endswith(BUFFERS)] if strict else []
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: encoder tensors do not match the config "
            f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
        )


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
        if not dtype.is_floating_point and not key.endswith(BUFFERS):
            raise CheckpointError(f"{folder}: tensor '{key}' is {dtype}, expected floating point")
        if expected[key] != tuple(shape):
            raise CheckpointError(
                f"{folder / 'config.json'} does not match the weights: tensor '{key}' is stored as "
                f"{list(shape)}, the config implies {list(expected[key])}"
            )
