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


def test_positive_weights_are_sqrt_neg_over_pos_clipped() -> None:
    from guardmerge.finetune import positive_weights

    # 10 rows; positives per label: 5, 1, 0, 8 (the last more positives than negatives)
    y = torch.zeros(10, 4)
    y[:5, 0] = 1
    y[0, 1] = 1
    y[:8, 3] = 1
    w = positive_weights(y, cap=30.0)
    assert w.tolist() == pytest.approx([1.0, 3.0, 30.0, 1.0])  # sqrt(5/5), sqrt(9/1), no positives: cap, 0.5 -> 1
    assert positive_weights(y.tolist(), cap=2.0).tolist() == pytest.approx([1.0, 2.0, 2.0, 1.0])
    assert positive_weights(y, cap=1.0).tolist() == [1.0] * 4  # cap 1: no weighting


def test_threshold_tuning_maximises_each_labels_f1() -> None:
    import numpy as np

    from guardmerge.finetune import tune_thresholds

    probs = np.array(
        [
            [0.90, 0.7, 0.01],
            [0.45, 0.2, 0.30],
            [0.40, 0.1, 0.60],
            [0.20, 0.6, 0.90],
            [0.10, 0.3, 0.40],
        ]
    )
    gold = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    cuts, f1s = tune_thresholds(probs, gold)
    # label 0: F1 1 for every t in (0.40, 0.45]; the one nearest 0.5 is 0.45 (0.5 itself gives F1 2/3)
    assert cuts[0] == pytest.approx(0.45) and f1s[0] == pytest.approx(1.0)
    # label 1: no positives -> 0.5; label 2: its positive (0.01) is below the whole grid -> F1 0 -> 0.5
    assert cuts[1:] == [0.5, 0.5] and f1s[1:] == [0.0, 0.0]
    # label 0 at a fixed 0.5 misses 0.45: tuning gains
    assert f1s[0] > 2 * 1 / (2 * 1 + 1)


def _keyword_task(n: int, seed: int) -> Examples:
    """Eight labels, label k present when keyword k is in the text; rare (about 6% positive each)."""
    rng = random.Random(seed)
    keys = ["happy", "sad", "angry", "hate", "love", "funny", "kill", "joke"]
    filler = [w for w in WORDS if w not in keys]
    texts, sets = [], []
    for _ in range(n):
        words = [rng.choice(filler) for _ in range(rng.randint(4, 8))]
        present = [k for k in range(len(keys)) if rng.random() < 0.06]
        for k in present:
            words.insert(rng.randrange(len(words) + 1), keys[k])
        texts.append(" ".join(words))
        sets.append(present)
    return Examples(texts, label_sets=sets)


KEYWORD_LABELS = ["happy", "sad", "angry", "hate", "love", "funny", "kill", "joke"]


def _macro_f1_at_stored(out: Path, test: Examples) -> float:
    from guardmerge.evaluate import evaluate
    from guardmerge.models.multihead import load_any

    return float(evaluate(load_any(out, "kw"), {"kw": test})["kw"]["macro_f1"])


def test_weighting_and_tuned_thresholds_learn_rare_labels(tmp_path: Path) -> None:
    """A short run on rare keyword labels: unweighted at 0.5 predicts (almost) nothing; weighted,
    with a faster head and thresholds tuned on validation, it finds the labels."""
    base = make_base(tmp_path / "base")
    train, valid, test = _keyword_task(320, 0), _keyword_task(160, 1), _keyword_task(160, 2)
    short = {"epochs": 8, "learning_rate": 1e-2, "batch_size": 16, "warmup": 0.1, "max_length": 16}
    old = FinetuneSettings(**short, pos_weight_max=1.0, tune_thresholds=False)
    new = FinetuneSettings(**short, head_learning_rate=3e-2)
    plain = finetune(base, train, KEYWORD_LABELS, tmp_path / "plain", old, progress=False, validation=valid)
    tuned = finetune(base, train, KEYWORD_LABELS, tmp_path / "tuned", new, progress=False, validation=valid)
    assert "guardmerge_expert" not in json.loads((plain / "config.json").read_text())
    before, after = _macro_f1_at_stored(plain, test), _macro_f1_at_stored(tuned, test)
    assert before < 0.05 and after > 0.25, (before, after)  # measured: 0.0 and 0.35


def test_tuned_thresholds_are_stored_and_read_by_load_and_eval(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from guardmerge.evaluate.metrics import labelled_report
    from guardmerge.models.expert_meta import EXPERT_KEY
    from guardmerge.models.multihead import load_any
    from tests.builders import edit_config

    words = _sentences(48)
    sets = [[i for i, w in enumerate(("happy", "sad")) if w in row] for row in words]
    train = Examples([" ".join(w) for w in words], label_sets=sets)
    valid = Examples([" ".join(w) for w in words[:24]], label_sets=sets[:24])
    settings = FinetuneSettings(epochs=2, learning_rate=1e-3, batch_size=8, max_length=16)
    out = finetune(
        make_base(tmp_path / "base"),
        train,
        ["happy", "sad"],
        tmp_path / "emo",
        settings,
        progress=False,
        validation=valid,
    )
    stored = json.loads((out / "config.json").read_text())[EXPERT_KEY]["thresholds"]
    record = json.loads((out / "guardmerge_finetune.json").read_text())
    assert set(stored) == {"happy", "sad"} and record["validation_examples"] == 24
    assert dict(load_any(out, "emo").spec("emo").thresholds) == stored
    AutoModelForSequenceClassification.from_pretrained(str(out))  # still a stock folder

    data = tmp_path / "data" / "emo"
    data.mkdir(parents=True)
    (data / "labels.json").write_text(json.dumps({"labels": ["happy", "sad"], "type": "multi_label"}))
    rows = [{"text": t, "labels": s} for t, s in zip(train.texts, sets, strict=True)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    edit_config(out, **{EXPERT_KEY: {"thresholds": {"happy": 0.0, "sad": 0.0}}})  # every label predicted
    res, _ = labelled_report(out, tmp_path / "data", task="emo")
    n_pos = sum(len(s) for s in sets)
    assert res["emo"]["micro_f1"] == pytest.approx(2 * n_pos / (n_pos + 2 * len(sets)), abs=1e-4)
    edit_config(out, **{EXPERT_KEY: {"thresholds": {"happy": 2.0}}})
    from guardmerge.errors import CheckpointError

    with pytest.raises(CheckpointError, match="must be in"):
        load_any(out, "emo")


def test_finetune_help_explains_the_multi_label_options() -> None:
    from typer.testing import CliRunner

    from guardmerge.cli import app

    text = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--pos-weight-max", "--tune-thresholds", "--head-lr", "--validation", "--warmup"):
        assert option in text


def test_cache_keys_of_unchanged_kinds_keep_their_old_form(tmp_path: Path) -> None:
    from guardmerge.data import TaskData
    from guardmerge.finetune import _RECIPE_FIELDS, _settings_key

    s = FinetuneSettings(epochs=2, learning_rate=1e-4)
    single = TaskData(name="hate", labels=["a", "b"], folder=tmp_path, type="single_label")
    multi = TaskData(name="go", labels=["a", "b"], folder=tmp_path, type="multi_label")
    assert _settings_key(s, single) == s.model_dump_json(exclude=set(_RECIPE_FIELDS))
    assert "pos_weight_max" in _settings_key(s, multi)
