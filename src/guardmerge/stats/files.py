"""Statistics files: Grams and Fisher of one expert, in safetensors, tied to that expert.

Layout of a statistics file (``safetensors``; every metadata value is a string, JSON-encoded
where it is not plain text):

Tensors
    ``gram/<gram key>``     ``[in, in]`` mean ``x x^T`` (float64 by default) — one per distinct
                            Linear input; q/k/v share one (see ``gram.map``).
    ``fisher/<name>``       ``[*shape]`` float32 diagonal Fisher of a canonical parameter name.

Metadata
    ``format``              ``guardmerge-stats``
    ``format_version``      ``1``
    ``guardmerge_version``  the writing guardmerge's version
    ``expert_fingerprint``  :func:`expert_fingerprint` of the expert the statistics belong to
    ``expert``              where the expert was when the file was written (informative only)
    ``kinds``               JSON list of the kinds present: ``["gram"]``, ``["fisher"]``, both
    ``max_length``          JSON int or null: the tokeniser's truncation length
    ``gram.n_examples``     JSON int: examples the Grams were averaged over
    ``gram.n_tokens``       JSON int: tokens averaged (non-padding unless include_padding)
    ``gram.include_padding`` JSON bool: padding tokens included (reference parity) or masked
    ``gram.max_length``     JSON int or null
    ``gram.map``            JSON object ``{canonical weight name: gram key}``; a shared input
                            (q, k, v) maps every weight to the first one's name, e.g.
                            ``{"encoder.layer.0.attention.self.key.weight":
                            "encoder.layer.0.attention.self.query.weight", ...}``
    ``gram.rows``           JSON object ``{gram key: rows averaged}`` (tokens, or examples for
                            pooled inputs such as ``pooler.dense`` and the head)
    ``gram.head``           JSON list of head weight names among ``gram.map``
    ``fisher.n_examples``   JSON int
    ``fisher.label_mode``   ``hard`` | ``soft`` | ``empirical``
    ``fisher.gradient``     ``per_example`` | ``batch``
    ``fisher.max_length``   JSON int or null
    ``fisher.head``         JSON list of head parameter names among the Fisher tensors
    ``extra.<key>``         free-form provenance given by the caller (data file, DARE settings)

The **expert fingerprint** is a cheap, stable identity of a checkpoint folder, not an integrity
check of every byte: see :func:`expert_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save

from guardmerge import __version__
from guardmerge.errors import CheckpointError, StatisticsError
from guardmerge.io.atomic import atomic_file
from guardmerge.io.finite import all_finite
from guardmerge.io.formats import CONFIG_FILE, read_json, weight_files
from guardmerge.io.safetensors import SafetensorsFile
from guardmerge.stats.fisher import FisherStats
from guardmerge.stats.gram import GramStats

log = logging.getLogger(__name__)

FORMAT = "guardmerge-stats"
FORMAT_VERSION = "1"
KINDS = ("gram", "fisher")
GRAM_PREFIX = "gram/"
FISHER_PREFIX = "fisher/"

FINGERPRINT_VERSION = "gmfp1"
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version"})
_EDGE_BYTES = 64 * 1024
_SAMPLES = 32
_SAMPLE_BYTES = 4 * 1024


def _sample_file(h: hashlib._Hash, path: Path, data_start: int) -> None:
    """Hash the file size, the first and last 64 KiB of its data and 32 evenly spaced 4 KiB."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    data_len = max(size - data_start, 0)
    with path.open("rb") as fh:
        offsets = [(data_start, _EDGE_BYTES), (max(size - _EDGE_BYTES, data_start), _EDGE_BYTES)]
        for k in range(_SAMPLES):
            offsets.append((data_start + (data_len * k) // _SAMPLES, _SAMPLE_BYTES))
        for offset, length in offsets:
            fh.seek(offset)
            h.update(fh.read(length))


def expert_fingerprint(folder: str | os.PathLike[str]) -> str:
    """A cheap, stable identity of a checkpoint folder: ``gmfp1:<sha256 hex>``.

    SHA-256 over, in order:

    1. ``config.json`` as canonical JSON (sorted keys) without the volatile keys
       ``_name_or_path`` and ``transformers_version``;
    2. for each weight file in name order (``model.safetensors``, or the shards of
       ``model.safetensors.index.json``): its name and size, its whole safetensors header
       (tensor names, dtypes, shapes, offsets), and sampled data: the first and last 64 KiB and
       32 evenly spaced 4 KiB chunks of the tensor data (``pytorch_model*.bin`` files: size and
       the same samples over the whole file).

    It reads about 200 KiB per file whatever the model size. Two fine-tuned experts differ in
    their head and in every encoder chunk, so they never share a fingerprint in practice; a
    byte-for-byte copy of a folder keeps its fingerprint, a re-save under another
    transformers version too.

    Raises:
        CheckpointError: no folder, no ``config.json``, or no weight file.
    """
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"expert folder '{folder}' not found")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"'{folder}' has no config.json")
    config = read_json(config_file, error=CheckpointError, what="model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"'{config_file}' is not a JSON object")
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(stable, sort_keys=True, separators=(",", ":")).encode())
    files, pickled = weight_files(path, allow_pickle=True)  # the one finder (shards inside the folder)
    for file in files:
        if not pickled:
            with file.open("rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"'{file}' is not a safetensors file (too short)")
                header_len = int.from_bytes(head, "little")
                header = fh.read(header_len)
            h.update(header)
            _sample_file(h, file, 8 + header_len)
        else:
            _sample_file(h, file, 0)
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"


def derive_fingerprint(fingerprint: str, **settings: object) -> str:
    """The fingerprint of an expert transformed before its statistics were taken.

    For example statistics of a DARE-sparsified expert (docs/algorithms.md 2: data-dependent
    mergers use statistics of the sparsified experts):
    ``derive_fingerprint(expert_fingerprint(folder), dare_density=0.5, seed=0)``.
    """
    body = json.dumps(settings, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{fingerprint}|{body}".encode()).hexdigest()
    return f"{FINGERPRINT_VERSION}:{digest}"


@dataclass
class ExpertStats:
    """The statistics of one expert, as written to / read from a statistics file.

    Attributes:
        fingerprint: the expert's :func:`expert_fingerprint`.
        gram: Grams, if present.
        fisher: diagonal Fisher, if present.
        expert: where the expert was when the statistics were written (informative).
        path: the file these were loaded from, if any.
        extra: free-form provenance (``extra.*`` metadata).
    """

    fingerprint: str
    gram: GramStats | None = None
    fisher: FisherStats | None = None
    expert: str = ""
    path: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def kinds(self) -> frozenset[str]:
        """The statistics present: a subset of ``{"gram", "fisher"}``."""
        return frozenset(k for k, v in (("gram", self.gram), ("fisher", self.fisher)) if v is not None)

    def for_tensor(self, name: str) -> dict[str, torch.Tensor]:
        """``{"gram": [in, in], "fisher": [*shape]}`` for a canonical tensor name (what exists)."""
        out: dict[str, torch.Tensor] = {}
        if self.gram is not None and name in self.gram:
            out["gram"] = self.gram.gram(name)  # type: ignore[assignment]
        if self.fisher is not None and name in self.fisher:
            out["fisher"] = self.fisher.fisher[name]
        return out


def stack_for_tensor(
    experts: Sequence[ExpertStats], name: str, kinds: frozenset[str] | set[str]
) -> dict[str, torch.Tensor]:
    """Per-expert statistics of one tensor stacked in expert order, as ``TensorContext.stats``.

    Returns ``{kind: [N, ...]}`` for each of ``kinds`` that every expert has for ``name``; a kind
    no expert has for ``name`` (biases have no Gram) is left out.

    Raises:
        StatisticsError: some experts have the kind for ``name`` and others do not, or shapes
            differ.
    """
    out: dict[str, torch.Tensor] = {}
    for kind in sorted(kinds):
        found = [e.for_tensor(name).get(kind) for e in experts]
        present = [t is not None for t in found]
        if not any(present):
            continue
        if not all(present):
            lacking = [e.path or e.expert or f"expert {i}" for i, e in enumerate(experts) if found[i] is None]
            raise StatisticsError(f"'{kind}' statistics for '{name}' are missing in: {', '.join(lacking)}")
        shapes = {tuple(t.shape) for t in found}  # type: ignore[union-attr]
        if len(shapes) > 1:
            raise StatisticsError(f"'{kind}' statistics for '{name}' differ in shape: {shapes}")
        out[kind] = torch.stack([t for t in found if t is not None])
    return out


class StackedStats(Mapping[str, dict[str, torch.Tensor]]):
    """Lazy ``{canonical tensor name: {kind: [N, ...]}}`` over experts, for the merge engine.

    ``table[name]`` (or ``table.get(name, {})``) stacks the experts' statistics of one tensor on
    demand (:func:`stack_for_tensor`), so no more than one tensor's statistics are stacked at a
    time. Names without any statistics map to ``{}``.
    """

    def __init__(self, experts: Sequence[ExpertStats], kinds: frozenset[str] | set[str]) -> None:
        self.experts = list(experts)
        self.kinds = frozenset(kinds)
        names: dict[str, None] = {}
        for e in self.experts:
            if e.gram is not None and "gram" in self.kinds:
                names.update(dict.fromkeys(e.gram.weight_to_gram))
            if e.fisher is not None and "fisher" in self.kinds:
                names.update(dict.fromkeys(e.fisher.fisher))
        self._names = list(names)

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        return stack_for_tensor(self.experts, name, self.kinds)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __bool__(self) -> bool:
        return bool(self.experts)


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=False)


def _gram_entries(gram: GramStats, dtype: torch.dtype, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Add the Grams (``gram.<key>``) and their metadata to a statistics file being built."""
    for key, g in gram.grams.items():
        tensors[GRAM_PREFIX + key] = g.detach().to("cpu", dtype).contiguous()
    meta.update(
        {
            "gram.n_examples": _json(gram.n_examples),
            "gram.n_tokens": _json(gram.n_tokens),
            "gram.include_padding": _json(gram.include_padding),
            "gram.max_length": _json(gram.max_length),
            "gram.map": _json(gram.weight_to_gram),
            "gram.rows": _json(gram.tokens),
            "gram.head": _json(sorted(gram.head)),
        }
    )


def _fisher_entries(fisher: FisherStats, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Add the diagonal Fisher (``fisher.<name>``) and its metadata to a statistics file being built."""
    for name, f in fisher.fisher.items():
        tensors[FISHER_PREFIX + name] = f.detach().to("cpu", torch.float32).contiguous()
    meta.update(
        {
            "fisher.n_examples": _json(fisher.n_examples),
            "fisher.label_mode": fisher.label_mode,
            "fisher.gradient": fisher.gradient,
            "fisher.max_length": _json(fisher.max_length),
            "fisher.head": _json(sorted(fisher.head)),
        }
    )


def save_stats(
    path: str | os.PathLike[str],
    *,
    gram: GramStats | None = None,
    fisher: FisherStats | None = None,
    expert: str | os.PathLike[str] | None = None,
    fingerprint: str | None = None,
    gram_dtype: torch.dtype = torch.float64,
    extra: Mapping[str, object] | None = None,
    force: bool = True,
) -> Path:
    """Write a statistics file (layout in the module docstring) and return its path.

    Args:
        path: the ``.safetensors`` file to write (parent folders are created).
        gram: Grams to store.
        fisher: Fisher to store.
        expert: the expert's folder; its fingerprint is computed unless ``fingerprint`` is given.
        fingerprint: the expert's fingerprint (e.g. :func:`derive_fingerprint` for a
            DARE-sparsified expert).
        gram_dtype: float64 (default, exact) or float32 (half the size).
        extra: free-form provenance, stored as ``extra.<key>`` strings.
        force: replace an existing file (written atomically either way).

    Raises:
        StatisticsError: nothing to store, or neither ``expert`` nor ``fingerprint`` given.
    """
    if gram is None and fisher is None:
        raise StatisticsError("nothing to save: give Grams and/or a Fisher")
    if fingerprint is None:
        if expert is None:
            raise StatisticsError("save_stats needs the expert folder or its fingerprint")
        fingerprint = expert_fingerprint(expert)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "guardmerge_version": __version__,
        "expert_fingerprint": fingerprint,
        "expert": str(expert) if expert is not None else "",
    }
    kinds = [k for k, s in (("gram", gram), ("fisher", fisher)) if s is not None]
    if gram is not None:
        _gram_entries(gram, gram_dtype, tensors, meta)
    if fisher is not None:
        _fisher_entries(fisher, tensors, meta)
    max_length = next((s.max_length for s in (gram, fisher) if s is not None and s.max_length is not None), None)
    for key, tensor in tensors.items():
        if not all_finite(tensor):
            raise StatisticsError(f"statistics tensor '{key}' holds NaN or Inf values; nothing was written to {path}")
    meta["kinds"] = _json(kinds)
    meta["max_length"] = _json(max_length)
    for key, value in (extra or {}).items():
        meta[f"extra.{key}"] = value if isinstance(value, str) else _json(value)
    out = Path(path)
    with atomic_file(out, force=force) as fh:  # a full disk or a kill never leaves a partial file
        fh.write(save(tensors, metadata=meta))
    log.info("wrote %s statistics to %s (%d tensors)", "+".join(kinds), out, len(tensors))
    return out


def read_stats_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a statistics file, without reading its tensors."""
    file = Path(path)
    if not file.is_file():
        raise StatisticsError(f"statistics file '{file}' not found")
    try:
        with SafetensorsFile(file) as fh:
            meta = dict(fh.metadata)
    except CheckpointError as exc:
        raise StatisticsError(str(exc)) from None
    if meta.get("format") != FORMAT:
        raise StatisticsError(f"'{file}' is not a guardmerge statistics file (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StatisticsError(
            f"'{file}' has statistics format version "
            f"{meta.get('format_version')!r}; this guardmerge reads "
            f"{FORMAT_VERSION}"
        )
    return meta


def check_fingerprint(
    path: str | os.PathLike[str],
    expert: str | os.PathLike[str] | None = None,
    *,
    fingerprint: str | None = None,
) -> None:
    """Refuse a statistics file that belongs to another expert.

    Raises:
        StatisticsError: naming the statistics file and the expert, when fingerprints differ.
    """
    meta = read_stats_metadata(path)
    expected = fingerprint if fingerprint is not None else expert_fingerprint(expert)  # type: ignore[arg-type]
    found = meta.get("expert_fingerprint", "")
    if found != expected:
        who = f"expert '{expert}'" if expert is not None else "the expected expert"
        written = f" (written for '{meta['expert']}')" if meta.get("expert") else ""
        raise StatisticsError(
            f"statistics file '{path}'{written} belongs to another expert than {who}: "
            f"fingerprint {found or '(none)'} in the file, {expected} for the expert. "
            "Recompute the statistics for this expert (guardmerge stats)."
        )


def _finite(tensor: torch.Tensor, path: str | os.PathLike[str], key: str) -> torch.Tensor:
    if not tensor.is_floating_point() or not all_finite(tensor):
        raise StatisticsError(f"'{path}': statistics tensor '{key[:80]}' is not finite floating point; refused")
    return tensor


def load_stats(
    path: str | os.PathLike[str],
    expert: str | os.PathLike[str] | None = None,
    *,
    fingerprint: str | None = None,
    kinds: Sequence[str] | None = None,
) -> ExpertStats:
    """Read a statistics file; with ``expert`` (or ``fingerprint``) check it belongs to it.

    Args:
        path: the statistics file.
        expert: the expert folder the statistics should belong to (checked by fingerprint).
        fingerprint: the expected fingerprint instead of ``expert`` (derived experts).
        kinds: load only these kinds (default: all present).

    Raises:
        StatisticsError: missing/malformed file, a requested kind absent, or a fingerprint
            mismatch (the message names both the statistics file and the expert).
    """
    meta = read_stats_metadata(path)
    if expert is not None or fingerprint is not None:
        check_fingerprint(path, expert, fingerprint=fingerprint)
    present = json.loads(meta.get("kinds", "[]"))
    wanted = list(kinds) if kinds is not None else present
    for kind in wanted:
        if kind not in KINDS:
            raise StatisticsError(f"unknown statistics kind '{kind}'; known: {', '.join(KINDS)}")
        if kind not in present:
            raise StatisticsError(
                f"statistics file '{path}' has no '{kind}' statistics (it has: {', '.join(present) or 'none'})"
            )
    grams: dict[str, torch.Tensor] = {}
    fishers: dict[str, torch.Tensor] = {}
    with SafetensorsFile(Path(path)) as fh:  # the one checked reader (offsets, dtypes)
        for key in fh.keys():  # noqa: SIM118 (not a dict)
            if key.startswith(GRAM_PREFIX) and "gram" in wanted:
                grams[key[len(GRAM_PREFIX) :]] = _finite(fh.get(key), path, key)
            elif key.startswith(FISHER_PREFIX) and "fisher" in wanted:
                fishers[key[len(FISHER_PREFIX) :]] = _finite(fh.get(key), path, key)
    gram = fisher = None
    try:
        if "gram" in wanted:
            mapping = json.loads(meta["gram.map"])
            missing = sorted(set(mapping.values()) - set(grams))
            if missing:
                raise StatisticsError(f"'{path}': Gram tensors missing for {', '.join(missing)}")
            gram = GramStats(
                grams=grams,
                weight_to_gram=mapping,
                tokens={k: int(v) for k, v in json.loads(meta["gram.rows"]).items()},
                head=frozenset(json.loads(meta["gram.head"])),
                n_examples=int(json.loads(meta["gram.n_examples"])),
                n_tokens=int(json.loads(meta["gram.n_tokens"])),
                include_padding=bool(json.loads(meta["gram.include_padding"])),
                max_length=json.loads(meta["gram.max_length"]),
            )
        if "fisher" in wanted:
            fisher = FisherStats(
                fisher=fishers,
                n_examples=int(json.loads(meta["fisher.n_examples"])),
                label_mode=meta["fisher.label_mode"],
                gradient=meta["fisher.gradient"],
                head=frozenset(json.loads(meta["fisher.head"])),
                max_length=json.loads(meta["fisher.max_length"]),
            )
    except (KeyError, ValueError) as exc:
        raise StatisticsError(f"'{path}': malformed statistics metadata ({exc})") from None
    extra = {k[len("extra.") :]: v for k, v in meta.items() if k.startswith("extra.")}
    return ExpertStats(
        fingerprint=meta["expert_fingerprint"],
        gram=gram,
        fisher=fisher,
        expert=meta.get("expert", ""),
        path=str(path),
        extra=extra,
    )
