"""Single-task export to stock transformers classes, and other families merged and exported."""

from pathlib import Path

import pytest
import torch

from guardmerge.config import parse_config
from guardmerge.errors import GuardmergeError
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.models.multihead import MultiHeadModel
from tests.builders import TEXTS, expert_logits, family_zoo


def test_export_task_loads_with_stock_transformers(merged: MultiHeadModel, tmp_path: Path) -> None:
    from transformers import AutoConfig

    out = merged.export_task("sentiment", tmp_path / "sent")
    cfg = AutoConfig.from_pretrained(str(out))
    assert cfg.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert torch.allclose(expert_logits(out), merged.logits(TEXTS)["sentiment"], atol=1e-6)


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
