"""JsonTokenizer (tokenizer.json via the tokenizers library) against transformers' fast tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from guardmerge.serve.tokenizer import JsonTokenizer, load_runtime_tokenizer
from tests.builders import TEXTS, make_base

KEYS = ("input_ids", "attention_mask", "token_type_ids", "offset_mapping", "special_tokens_mask")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("tok") / "base")


@pytest.mark.parametrize("side", ["right", "left"])
def test_same_encoding_as_transformers(folder: Path, side: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["padding_side"] = side
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = JsonTokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    texts = [*TEXTS, "HAPPY unknownword, sad!"]
    for kwargs in ({"padding": True, "truncation": True, "max_length": 6}, {"padding": True}):
        a = ours(texts, return_tensors="np", return_offsets_mapping=True, return_special_tokens_mask=True, **kwargs)
        b = theirs(texts, return_tensors="np", return_offsets_mapping=True, return_special_tokens_mask=True, **kwargs)
        for key in KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} {kwargs} {side}")
    lists = ours(texts, truncation=True, max_length=8)
    assert lists["input_ids"] == theirs(texts, truncation=True, max_length=8)["input_ids"]
    ids = lists["input_ids"][1]
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    assert ours.unk_token_id == theirs.unk_token_id and ours.pad_token_id == theirs.pad_token_id


def test_falls_back_to_transformers_without_tokenizer_json(folder: Path, tmp_path: Path) -> None:
    assert isinstance(load_runtime_tokenizer(folder), JsonTokenizer)
    assert load_runtime_tokenizer(tmp_path) is None  # no tokenizer at all: transformers says so, None
