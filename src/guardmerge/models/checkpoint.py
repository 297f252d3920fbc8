"""A checkpoint under canonical tensor names: the one checked reader with its family's names.

Checkpoints name the same tensor differently: a headless ``BertModel`` stores
``encoder.layer.0...``, a ``BertForSequenceClassification`` stores ``bert.encoder.layer.0...``.
:class:`Checkpoint` reads through :class:`~guardmerge.io.checkpoint.CheckpointFiles` (every
file and tensor check) and maps stored names to **canonical** ones with the family's adapter
(:mod:`guardmerge.models.adapters`), so the same tensor has the same name whatever the class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from guardmerge.errors import CheckpointError
from guardmerge.io.checkpoint import CheckpointFiles, resolve
from guardmerge.io.formats import CONFIG_FILE, clip, has_tokenizer, read_config
from guardmerge.models.adapters import ArchitectureAdapter, get_adapter


class Checkpoint:
    """A model folder opened for lazy, checked, tensor-by-tensor reading under canonical names.

    Args:
        source: what the user named (path or hub id).
        allow_pickle: accept ``pytorch_model.bin`` weights.
        revision: the hub revision of a hub id.
        folder: the local folder ``source`` already resolved to (a merge job's).
        where: how errors name this checkpoint (default: ``source``; the engine names the expert).

    Attributes:
        source, path, config, adapter: what was named, the local folder, its ``config.json``
        and the architecture adapter of its ``model_type``.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        allow_pickle: bool = False,
        revision: str | None = None,
        folder: Path | None = None,
        where: str | None = None,
    ) -> None:
        self.source = str(source)
        self.where = where or self.source
        self.path = folder if folder is not None else resolve(source, revision=revision)
        self.config: dict[str, Any] = read_config(self.path, where=where)
        self.adapter: ArchitectureAdapter = get_adapter(self.model_type, where=str(self.path / CONFIG_FILE))
        self.files = CheckpointFiles(self.path, allow_pickle=allow_pickle, where=self.where, config=self.config)
        try:
            self._index: dict[str, str] = {}  # canonical -> stored key
            for key in self.files.stored_names():
                canonical = self.adapter.canonical(key)
                if canonical in self._index:
                    raise CheckpointError(
                        f"{self.files.file_of(key).name}: tensor '{clip(canonical)}' is stored twice ({self.where})"
                    )
                self._index[canonical] = key
        except BaseException:
            self.files.close()
            raise

    # -- access ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Canonical names of every stored tensor."""
        return list(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def stored_name(self, name: str) -> str:
        try:
            return self._index[name]
        except KeyError:
            raise CheckpointError(f"{self.source}: no tensor '{clip(name)}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files.shape(self.stored_name(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.files.dtype(self.stored_name(name))

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor into a fresh tensor, optionally cast (see :meth:`read_into`)."""
        return self.read_into(name, torch.empty(self.shape(name), dtype=dtype or self.dtype(name)))

    def read_into(
        self, name: str, out: torch.Tensor, scratch: Callable[[torch.dtype], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Read one tensor into ``out`` (contiguous, same element count), casting to ``out.dtype``
        (:meth:`guardmerge.io.checkpoint.CheckpointFiles.read_into`: NaN and Inf refused)."""
        return self.files.read_into(self.stored_name(name), out, scratch, name=name)

    def items(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.get(name)

    # -- metadata ----------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    @property
    def problem(self) -> str:
        """The head kind of this classifier: ``single_label``, ``multi_label`` (``problem_type:
        multi_label_classification``) or ``token`` (the family's ``*ForTokenClassification``)."""
        return self.adapter.problem(self.config)

    def id2label(self) -> list[str]:
        """Label names in index order, from ``config.json`` (``LABEL_i`` where absent)."""
        raw = self.config.get("id2label") or {}
        if not isinstance(raw, dict):
            raise CheckpointError(f"{self.where}: config.json 'id2label' is not an object")
        declared = self.config.get("num_labels")
        if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int) or declared < 0):
            raise CheckpointError(f"{self.where}: config.json 'num_labels' is not a count")
        n = int(declared or len(raw) or 0)
        last_weight = self.adapter.label_weight(self.problem)
        if last_weight in self:
            rows = self.shape(last_weight)[0]
            if (raw and len(raw) != rows) or (declared is not None and declared != rows):
                count = declared if declared is not None and declared != rows else len(raw)
                raise CheckpointError(
                    f"{self.where}: config.json declares {count} labels but its classifier "
                    f"'{last_weight}' has {rows} outputs; fix id2label/num_labels"
                )
            n = rows
        names = [raw.get(str(i), raw.get(i, f"LABEL_{i}")) for i in range(n)]
        bad = [x for x in names if not isinstance(x, str) or not x.strip() or len(x) > 200]
        if bad:
            raise CheckpointError(f"{self.where}: config.json 'id2label' has a label that is not a short name")
        return [str(x) for x in names]

    def has_tokenizer(self) -> bool:
        return has_tokenizer(self.path)

    def close(self) -> None:
        self.files.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, model_type={self.model_type!r})"
