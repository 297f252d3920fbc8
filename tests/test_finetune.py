"""Fine-tuning multi-label and token experts on a tiny random BERT."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from guardmerge.data import Examples
from guardmerge.errors import DataError
from guardmerge.finetune import FinetuneSettings, _encode, finetune
from tests.builders import WORDS, make_base

FAST = FinetuneSettings(epochs=25, learning_rate=1e-2, batch_size=8, warmup=0.0, max_length=16)


def _sentences(n: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(3, 8))] for _ in range(n)]


def test_token_targets_go_to_the_first_sub_token(tmp_path: Path) -> None:
    """``happy!`` is two sub-tokens: the tag goes to ``happy``, ``!`` and the specials get -100."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_base(tmp_path / "base")))
    ex = Examples(["ignore happy! now"], words=[["ignore", "happy!", "now"]], tags=[[1, 2, 0]])
    columns, targets = _encode(tok, ex, 3, 16)
    assert len(columns["input_ids"][0]) == 6  # [CLS] ignore happy ! now [SEP]
    assert targets == [[-100, 1, 2, -100, 0, -100]]
    with pytest.raises(DataError, match="label index 5 outside the 3 label names"):
        _encode(tok, Examples(["now"], words=[["now"]], tags=[[5]]), 3, 16)


def test_token_expert_learns_a_word_tag(tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    words = _sentences(48)
    tags = [[1 if w in ("happy", "sad") else 0 for w in row] for row in words]
    ex = Examples([" ".join(w) for w in words], words=words, tags=tags)
    out = finetune(make_base(tmp_path / "base"), ex, ["O", "B-EMO"], tmp_path / "ner", FAST, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"] and config["id2label"]["1"] == "B-EMO"
    model = AutoModelForTokenClassification.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    test = _sentences(20, seed=1)
    enc = tok(test, is_split_into_words=True, return_tensors="pt", padding=True)
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    hits = total = 0
    for row, sentence in enumerate(test):
        for pos, word in enumerate(enc.word_ids(row)):
            if word is not None:
                hits += int(pred[row, pos]) == int(sentence[word] in ("happy", "sad"))
                total += 1
    assert hits / total > 0.95


def test_multi_label_expert_learns_label_sets(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    words = _sentences(64)
    sets = [[i for i, w in enumerate(("happy", "sad")) if w in row] for row in words]
    ex = Examples([" ".join(w) for w in words], label_sets=sets)
    out = finetune(make_base(tmp_path / "base"), ex, ["happy", "sad"], tmp_path / "ml", FAST, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    test = _sentences(40, seed=2)
    with torch.no_grad():
        probs = torch.sigmoid(model(**tok([" ".join(w) for w in test], return_tensors="pt", padding=True)).logits)
    want = torch.tensor([[float(w in row) for w in ("happy", "sad")] for row in test])
    assert float(((probs > 0.5).float() == want).float().mean()) > 0.9


def _with_nan(src: Path, dst: Path) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    key = next(k for k in state if k.endswith("attention.self.query.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_nan_base_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    from guardmerge.errors import CheckpointError

    base = _with_nan(make_base(tmp_path / "base"), tmp_path / "nan-base")
    train = Examples(["a b", "c d"], labels=[0, 1])
    with pytest.raises(CheckpointError, match="NaN"):
        finetune(base, train, ["x", "y"], tmp_path / "out", FAST, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    from guardmerge.errors import GuardmergeError

    base = make_base(tmp_path / "base")
    train = Examples([" ".join(s) for s in _sentences(16)], labels=[i % 2 for i in range(16)])
    huge = FinetuneSettings(epochs=2, learning_rate=1e30, batch_size=8, warmup=0.0, max_length=16)
    with pytest.raises(GuardmergeError, match="diverged|NaN"):
        finetune(base, train, ["x", "y"], tmp_path / "out", huge, progress=False)
    assert not (tmp_path / "out").exists()
