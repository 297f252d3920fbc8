"""A fast tokenizer from ``tokenizer.json`` alone (the ``tokenizers`` library), for processes that
run an ONNX export: serving it with ``--backend onnx`` or the LLM Guard scanners then imports
neither torch nor transformers (about 200 MiB less resident memory).

:class:`JsonTokenizer` answers the calls guardmerge makes of a transformers fast tokenizer
(batch encoding with padding, truncation, offsets and special-token masks; ids to tokens), with
the same ids: normalisation, pre-tokenisation, the model and the special tokens all live in
``tokenizer.json``. Padding side and pad token come from ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from guardmerge.errors import GuardmergeError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


class JsonTokenizer:
    """``tokenizers.Tokenizer`` behind the subset of the transformers fast-tokenizer API that
    guardmerge's ONNX backend uses."""

    is_fast = True

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self._tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER_FILE))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        config = _read(self.folder / "tokenizer_config.json")
        special = _read(self.folder / "special_tokens_map.json")
        self.padding_side = str(config.get("padding_side") or "right")
        self.truncation_side = str(config.get("truncation_side") or "right")
        self.pad_token_id = self._id(config.get("pad_token") or special.get("pad_token"), 0)
        self.unk_token_id = self._id(config.get("unk_token") or special.get("unk_token"), None)

    def _id(self, token: Any, default: int | None) -> int | None:
        if isinstance(token, dict):  # {"content": "[PAD]", ...}
            token = token.get("content")
        found = self._tokenizer.token_to_id(str(token)) if token is not None else None
        return default if found is None else int(found)

    def __call__(
        self,
        texts: Sequence[str],
        *,
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_offsets_mapping: bool = False,
        return_special_tokens_mask: bool = False,
    ) -> dict[str, Any]:
        """Encode a batch: ``input_ids``, ``attention_mask``, ``token_type_ids`` (and offsets and
        special-token masks when asked), lists per text, or ``int64`` arrays ``[B, T]`` padded
        to the longest text with ``return_tensors="np"``."""
        if return_tensors not in (None, "np"):
            raise GuardmergeError(f"JsonTokenizer returns numpy arrays or lists, not '{return_tensors}'")
        if truncation and max_length:
            self._tokenizer.enable_truncation(max_length, direction=self.truncation_side)
        else:
            self._tokenizer.no_truncation()
        encodings = self._tokenizer.encode_batch(list(texts))
        out: dict[str, list[list[Any]]] = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encodings]
        if return_special_tokens_mask:
            out["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
        if not padding and return_tensors is None:
            return out
        width = max((len(x) for x in out["input_ids"]), default=0)
        fill = {"input_ids": self.pad_token_id or 0, "offset_mapping": (0, 0), "special_tokens_mask": 1}
        padded: dict[str, Any] = {}
        for name, rows in out.items():
            value = fill.get(name, 0)
            rows = [
                ([value] * (width - len(r)) + list(r))
                if self.padding_side == "left"
                else (list(r) + [value] * (width - len(r)))
                for r in rows
            ]
            padded[name] = np.asarray(rows, dtype=np.int64) if return_tensors == "np" else rows
        return padded

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tokenizer.id_to_token(int(i)) or "" for i in ids]


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GuardmergeError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def load_runtime_tokenizer(folder: str | Path) -> Any:
    """The folder's tokenizer without transformers when it has ``tokenizer.json`` and the
    ``tokenizers`` package is installed; else transformers' ``AutoTokenizer`` (None when the
    folder has no usable tokenizer)."""
    folder = Path(folder)
    if (folder / TOKENIZER_FILE).is_file():
        try:
            return JsonTokenizer(folder)
        except ImportError:
            log.info("the tokenizers package is missing: %s is read with transformers", folder)
        except Exception as exc:  # an unreadable tokenizer.json: transformers says why
            log.warning("%s/%s could not be read directly (%s); trying transformers", folder, TOKENIZER_FILE, exc)
    from guardmerge.models.folder import load_tokenizer

    return load_tokenizer(folder)
