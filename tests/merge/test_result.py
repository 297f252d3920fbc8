"""A merged model held as tensors (guardmerge.merge.result.MergeResult): turned into a module
without a disk round trip, every tensor where it was, the tokenizer of ``tokenizer_dir``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from guardmerge.config import parse_config
from guardmerge.errors import GuardmergeError
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.merge.result import MergeResult
from tests.builders import TEXTS, expert_logits


@pytest.fixture(scope="module")
def result(zoo: dict[str, Path]) -> MergeResult:
    config = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo[t]), "task": t} for t in ("hate", "sentiment")],
            "parameters": {"scaling": 0.4},
        }
    )
    return merge(MergeJob.of(config), progress=False)


def test_to_model_holds_every_tensor_of_the_result(result: MergeResult) -> None:
    model = result.to_model()
    assert model.tasks == ["hate", "sentiment"] and model.labels("sentiment") == ["neg", "neu", "pos"]
    state = model.state_tensors()
    assert set(state) == set(result.tensors)  # encoder and heads.<task>.*: nothing lost, nothing added
    assert all(torch.equal(state[n], t) for n, t in result.tensors.items())
    again = MergeResult(state, result.config, result.heads, result.info, result.tokenizer_dir).to_model()
    a, b = model.logits(TEXTS), again.logits(TEXTS)  # the round trip changes nothing
    assert all(torch.equal(a[t], b[t]) for t in a)
    assert model.info["method"] == "task_arithmetic"


def test_to_model_reads_the_tokenizer_of_its_folder(result: MergeResult, zoo: dict[str, Path]) -> None:
    assert result.tokenizer_dir is not None
    model = result.to_model()
    assert model.encode(["sure"])["input_ids"].shape[0] == 1
    one = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo["hate"]), "task": "hate"}],
            "parameters": {"scaling": 1.0},
        }
    )
    alone = merge(MergeJob.of(one), progress=False).to_model()
    assert torch.allclose(alone.logits(TEXTS)["hate"], expert_logits(zoo["hate"]), atol=1e-5)


def test_a_shared_head_merge_is_not_a_multi_head_model(result: MergeResult) -> None:
    shared = MergeResult(result.tensors, result.config, {}, {**result.info, "heads_mode": "shared"})
    with pytest.raises(GuardmergeError, match="heads: shared merge is one stock transformers model"):
        shared.to_model()
