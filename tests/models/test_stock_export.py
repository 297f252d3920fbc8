"""Single-task export to stock transformers classes, and other families merged and exported."""

from pathlib import Path

import pytest
import torch

from guardmerge.config import parse_config
from guardmerge.errors import GuardmergeError
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.models.multihead import MultiHeadModel
from tests.builders import TEXTS, expert_logits, write_tokenizer


def test_export_task_loads_with_stock_transformers(merged: MultiHeadModel, tmp_path: Path) -> None:
    from transformers import AutoConfig

    out = merged.export_task("sentiment", tmp_path / "sent")
    cfg = AutoConfig.from_pretrained(str(out))
    assert cfg.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert torch.allclose(expert_logits(out), merged.logits(TEXTS)["sentiment"], atol=1e-6)


def family_zoo(root: Path, family: str) -> tuple[Path, list[Path]]:
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
    base, (e0, e1) = family_zoo(tmp_path, family)
    one = parse_config(
        {"base_model": str(base), "experts": [{"model": str(e1), "task": "t1"}], "parameters": {"scaling": 1.0}}
    )
    model = merge(MergeJob.of(one), progress=False).to_model()
    assert torch.allclose(model.logits(TEXTS)["t1"], expert_logits(e1), atol=1e-5)
    two = parse_config(
        {"base_model": str(base), "experts": [{"model": str(e0), "task": "t0"}, {"model": str(e1), "task": "t1"}]}
    )
    res = merge(MergeJob.of(two), progress=False)
    assert len(res.heads["t0"].layers) == 2  # hidden layer in the head
    m2 = res.to_model()
    m2.export_task("t1", tmp_path / "exp")
    assert torch.allclose(expert_logits(tmp_path / "exp"), m2.logits(TEXTS)["t1"], atol=1e-5)
    hm3 = parse_config({"base_model": str(base), "experts": [{"model": str(e0), "task": "t0"}], "heads": "hm3"})
    with pytest.raises(GuardmergeError, match="hm3 needs a single Linear head"):
        merge(MergeJob.of(hm3), progress=False)
