"""The compatibility checks run before any merge work, and the plan they return
(guardmerge.merge.plan): errors name the expert and the field or tensor at fault."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from guardmerge.errors import CompatibilityError, ConfigError
from guardmerge.merge.plan import MergePlan, plan_merge
from guardmerge.models.checkpoint import Checkpoint
from tests.builders import WORDS, copy_expert, edit_weights, make_base, make_expert


def plan_of(base: Path, experts: dict[str, Path], **kwargs: object) -> MergePlan:
    """``plan_merge`` over freshly opened checkpoints, each expert named as the engine names it."""
    with Checkpoint(base, where="base model") as b:
        opened = {t: Checkpoint(p, where=f"expert '{t}' ({p})") for t, p in experts.items()}
        try:
            return plan_merge(b, opened, **kwargs)  # type: ignore[arg-type]
        finally:
            for ck in opened.values():
                ck.close()


def test_the_plan_merges_the_encoder_and_keeps_one_head_per_task(zoo: dict[str, Path]) -> None:
    plan = plan_of(zoo["base"], {"hate": zoo["hate"], "sentiment": zoo["sentiment"]})
    assert plan.labels == {"hate": ("not-hate", "hate"), "sentiment": ("neg", "neu", "pos")}
    assert plan.problems == {"hate": "single_label", "sentiment": "single_label"}
    assert set(plan.heads) == {"hate", "sentiment"} and not plan.shared
    assert "encoder.layer.0.attention.self.query.weight" in plan.merge_names
    assert "pooler.dense.weight" in plan.merge_names
    assert not any(n.startswith("classifier.") for n in plan.merge_names)  # heads stay per task
    assert plan.head_tensor_names("hate") == ["classifier.weight", "classifier.bias"]
    assert plan.branch_names == () and plan.share_layers is None


def test_a_sharing_depth_leaves_the_blocks_above_it_to_each_task(zoo: dict[str, Path]) -> None:
    plan = plan_of(zoo["base"], {"hate": zoo["hate"]}, share_layers=1)
    assert plan.branch_names and all(n.startswith(("encoder.layer.1.", "pooler.")) for n in plan.branch_names)
    assert "encoder.layer.0.output.dense.weight" in plan.merge_names
    assert not any(n.startswith(("encoder.layer.1.", "pooler.")) for n in plan.merge_names)
    with pytest.raises(ConfigError, match="share_layers is 3 but the base .* has 2 layers"):
        plan_of(zoo["base"], {"hate": zoo["hate"]}, share_layers=3)


def test_an_expert_of_another_hidden_size_is_refused_naming_it_and_the_field(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    wide = make_base(tmp_path / "wide-base", hidden_size=32)
    expert = make_expert(tmp_path / "wide", wide, ["a", "b"], seed=4)
    with pytest.raises(CompatibilityError, match=r"expert 'wide' .*config field 'hidden_size' is 32 but the base"):
        plan_of(zoo["base"], {"hate": zoo["hate"], "wide": expert})


def test_a_tensor_of_another_shape_is_refused_naming_the_tensor(zoo: dict[str, Path], tmp_path: Path) -> None:
    bad = copy_expert(zoo["hate"], tmp_path / "bad")
    name = "encoder.layer.1.intermediate.dense.weight"
    edit_weights(bad, lambda s: s.__setitem__(f"bert.{name}", torch.zeros(48, 16)))
    with pytest.raises(CompatibilityError, match=rf"expert 'bad' .*tensor '{name}' has shape \[48, 16\] but the base"):
        plan_of(zoo["base"], {"bad": bad})
    missing = copy_expert(zoo["hate"], tmp_path / "missing")
    edit_weights(missing, lambda s: s.pop(f"bert.{name}"))
    with pytest.raises(CompatibilityError, match=rf"expert 'gap' .*is missing encoder tensor '{name}'"):
        plan_of(zoo["base"], {"gap": missing})


def test_an_expert_with_another_vocabulary_is_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    words = [*WORDS[:-1], "zebra"]  # as many tokens, one of them different
    other = make_expert(tmp_path / "other", zoo["base"], ["a", "b"], seed=5, words=words)
    with pytest.raises(CompatibilityError, match=r"expert 'other' .*different vocabulary.*zebra"):
        plan_of(zoo["base"], {"hate": zoo["hate"], "other": other})


def test_per_task_depths_give_each_task_its_own_blocks_and_merge_what_any_task_shares(zoo: dict[str, Path]) -> None:
    experts = {"hate": zoo["hate"], "sentiment": zoo["sentiment"]}
    plan = plan_of(zoo["base"], experts, share_layers={"hate": 2, "sentiment": 1})
    assert plan.share_layers == {"hate": 2, "sentiment": 1}
    assert "hate" not in plan.branches  # K_t = L: no branch
    assert plan.branches["sentiment"] and all(
        n.startswith(("encoder.layer.1.", "pooler.")) for n in plan.branches["sentiment"]
    )
    assert "encoder.layer.1.output.dense.weight" in plan.merge_names  # hate shares block 1
    assert "pooler.dense.weight" in plan.merge_names
    assert plan.blocks_per_pass() == 2 + 1
    assert plan_of(zoo["base"], experts, share_layers={"hate": 1, "sentiment": 1}).share_layers == 1
