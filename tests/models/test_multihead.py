"""The multi-head artifact: predict, save/load, single-task export, other architectures."""

from pathlib import Path

import pytest
import torch

import guardmerge
from guardmerge.config import parse_config
from guardmerge.engine import merge
from guardmerge.errors import GuardmergeError
from guardmerge.models.multihead import MultiHeadModel
from tests.conftest import TEXTS, expert_logits, write_tokenizer


@pytest.fixture(scope="module")
def merged(zoo: dict[str, Path]) -> MultiHeadModel:
    c = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo[t]), "task": t} for t in ("hate", "injection", "sentiment")],
            "method": "task_arithmetic",
            "parameters": {"scaling": 0.4},
        }
    )
    return merge(c, progress=False).to_model()


def test_predict_returns_every_head_in_input_order(merged: MultiHeadModel) -> None:
    out = merged.predict(TEXTS, batch_size=3)
    assert set(out) == {"hate", "injection", "sentiment"}
    logits = merged.logits(TEXTS)
    for task, rows in out.items():
        assert len(rows) == len(TEXTS)
        probs = torch.softmax(logits[task], -1)
        for i, row in enumerate(rows):
            assert row["label"] == merged.labels(task)[int(probs[i].argmax())]
            assert row["score"] == pytest.approx(float(probs[i].max()), abs=1e-6)
    # batch size does not change results, order is kept
    single = merged.predict(TEXTS[::-1], batch_size=1)
    assert [r["label"] for r in single["sentiment"]] == [r["label"] for r in out["sentiment"]][::-1]


def test_encoder_runs_once_per_batch(merged: MultiHeadModel) -> None:
    calls = []
    hook = merged.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        merged.predict(TEXTS, batch_size=4)
    finally:
        hook.remove()
    assert len(calls) == 2  # 8 texts, batch 4, three heads


def test_save_load_round_trip_keeps_heads_labels_and_logits(merged: MultiHeadModel, tmp_path: Path) -> None:
    merged.save_pretrained(tmp_path / "m")
    loaded = guardmerge.load(tmp_path / "m")
    assert loaded.tasks == merged.tasks
    for t in merged.tasks:
        assert loaded.labels(t) == merged.labels(t)
    a, b = merged.logits(TEXTS), loaded.logits(TEXTS)
    assert all(torch.equal(a[t], b[t]) for t in a)


def test_export_task_loads_with_stock_transformers(merged: MultiHeadModel, tmp_path: Path) -> None:
    from transformers import AutoConfig

    out = merged.export_task("sentiment", tmp_path / "sent")
    cfg = AutoConfig.from_pretrained(str(out))
    assert cfg.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert torch.allclose(expert_logits(out), merged.logits(TEXTS)["sentiment"], atol=1e-6)


def test_unknown_task_is_named(merged: MultiHeadModel) -> None:
    with pytest.raises(GuardmergeError, match="unknown task 'spam'.*hate"):
        merged.predict(TEXTS, tasks=["spam"])


def test_loading_a_plain_classifier_folder_explains(zoo: dict[str, Path]) -> None:
    with pytest.raises(GuardmergeError, match="not a merged multi-head model"):
        MultiHeadModel.from_pretrained(zoo["hate"])
    one = MultiHeadModel.from_classifier(zoo["hate"], "hate")
    assert torch.allclose(one.logits(TEXTS)["hate"], expert_logits(zoo["hate"]), atol=1e-6)


def _family_zoo(root: Path, family: str) -> tuple[Path, list[Path]]:
    """A base and two experts of another family, saved as real HF folders."""
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        DistilBertConfig,
        RobertaConfig,
    )

    if family == "roberta":
        cfg = RobertaConfig(
            vocab_size=60,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=70,
            pad_token_id=0,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    else:
        cfg = DistilBertConfig(
            vocab_size=60,
            dim=16,
            n_layers=2,
            n_heads=2,
            hidden_dim=32,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
        )
    torch.manual_seed(0)
    base = AutoModel.from_config(cfg)
    base.save_pretrained(str(root / "base"), safe_serialization=True)
    write_tokenizer(root / "base")
    experts = []
    for i, labels in enumerate((["a", "b"], ["x", "y", "z"])):
        cfg.num_labels = len(labels)
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {n: j for j, n in enumerate(labels)}
        m = AutoModelForSequenceClassification.from_config(cfg)
        getattr(m, family).load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        m.save_pretrained(str(root / f"e{i}"), safe_serialization=True)
        write_tokenizer(root / f"e{i}")
        experts.append(root / f"e{i}")
    return root / "base", experts


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_families_merge_and_export(family: str, tmp_path: Path) -> None:
    base, (e0, e1) = _family_zoo(tmp_path, family)
    one = parse_config(
        {"base_model": str(base), "experts": [{"model": str(e1), "task": "t1"}], "parameters": {"scaling": 1.0}}
    )
    model = merge(one, progress=False).to_model()
    assert torch.allclose(model.logits(TEXTS)["t1"], expert_logits(e1), atol=1e-5)
    two = parse_config(
        {"base_model": str(base), "experts": [{"model": str(e0), "task": "t0"}, {"model": str(e1), "task": "t1"}]}
    )
    res = merge(two, progress=False)
    assert len(res.heads["t0"].layers) == 2  # hidden layer in the head
    m2 = res.to_model()
    m2.export_task("t1", tmp_path / "exp")
    assert torch.allclose(expert_logits(tmp_path / "exp"), m2.logits(TEXTS)["t1"], atol=1e-5)
    hm3 = parse_config({"base_model": str(base), "experts": [{"model": str(e0), "task": "t0"}], "heads": "hm3"})
    with pytest.raises(GuardmergeError, match="hm3 needs a single Linear head"):
        merge(hm3, progress=False)
