"""A model with a sharing depth (guardmerge.models.branches): the trunk runs once then each task's
branch, branch tensors stored under ``branches.<task>.*``, save/load, export of a branch to a stock
classifier, the branch point and the branch's affine map. The merge that builds these models:
tests/merge/test_branches.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import guardmerge
from guardmerge.config import parse_config
from guardmerge.errors import GuardmergeError
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.models.branches import Affine, Capture
from guardmerge.models.multihead import MultiHeadModel
from tests.builders import MERGED_TASKS, TEXTS, expert_logits, family_zoo, zoo_merge_config

TASKS = MERGED_TASKS
LAYERS = 2  # the conftest zoo's num_hidden_layers


@pytest.fixture(scope="module")
def branched(zoo: dict[str, Path]) -> MultiHeadModel:
    """The zoo's three experts at sharing depth 1: one merged block, each task's own block 1 and pooler."""
    return merge(MergeJob.of(zoo_merge_config(zoo, share_layers=1)), progress=False).to_model()


def test_trunk_runs_once_then_each_branch(branched: MultiHeadModel) -> None:
    assert branched.share_layers == 1
    trunk_blocks = list(branched.encoder.encoder.layer)[:-1]
    assert len(trunk_blocks) == 1
    calls: list[str] = []
    hooks = [b.register_forward_hook(lambda *a: calls.append("trunk")) for b in trunk_blocks]
    for t in TASKS:
        hooks += [b.register_forward_hook(lambda *a, t=t: calls.append(t)) for b in branched.branch(t).blocks]
    try:
        batch = branched.encode(TEXTS)
        branched(**batch)
        assert calls.count("trunk") == 1  # K calls per forward, not K * tasks
        assert all(calls.count(t) == LAYERS - 1 for t in TASKS)
        calls.clear()
        branched(tasks=["sentiment"], **batch)
        assert calls == ["trunk", "sentiment"]
    finally:
        for h in hooks:
            h.remove()


def test_save_load_round_trip_keeps_logits_labels_and_format(branched: MultiHeadModel, tmp_path: Path) -> None:
    from safetensors import safe_open

    branched.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["guardmerge"]["share_layers"] == 1
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "branches.hate.encoder.layer.1.attention.self.query.weight" in names
    assert "branches.sentiment.pooler.dense.weight" in names
    assert not any(n.startswith(("encoder.layer.1.", "pooler.")) for n in names)  # not shared
    loaded = guardmerge.load(tmp_path / "m")
    assert loaded.tasks == branched.tasks and loaded.share_layers == 1
    assert all(loaded.labels(t) == branched.labels(t) for t in TASKS)
    a, b = branched.logits(TEXTS), loaded.logits(TEXTS)
    assert all(torch.allclose(a[t], b[t], atol=1e-6) for t in TASKS)


def test_export_task_is_a_stock_classifier(branched: MultiHeadModel, tmp_path: Path) -> None:
    for t in ("hate", "sentiment"):
        out = branched.export_task(t, tmp_path / t)
        assert torch.allclose(expert_logits(out), branched.logits(TEXTS)[t], atol=1e-5), t


def test_a_branch_state_holds_its_own_blocks_pooler_and_align_under_canonical_names(
    branched: MultiHeadModel,
) -> None:
    branch = branched.branch("hate")
    assert branch.start == 1 and len(branch.blocks) == LAYERS - 1 and branch.align is None
    names = set(branch.state())
    assert "encoder.layer.1.attention.self.query.weight" in names and "pooler.dense.weight" in names
    assert not any(n.startswith(("encoder.layer.0.", "embeddings.", "align.")) for n in names)  # the trunk's
    other = branched.branch("sentiment").state()["encoder.layer.1.output.dense.weight"]
    assert not torch.equal(branch.state()["encoder.layer.1.output.dense.weight"], other)  # each expert's own


def test_affine_map_and_branch_point() -> None:
    scale, shift = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, -3.0])
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(Affine(scale, shift)(x), x * scale.double() + shift.double())
    point = Capture()
    with pytest.raises(GuardmergeError, match="did not reach its branch point"):
        point.take()
    hidden, mask = torch.randn(1, 2, 3), torch.ones(1, 2)
    assert point(hidden, mask, flag=True) is hidden  # passes the hidden states through unchanged
    args, kwargs = point.take()  # the block arguments the branches' blocks are called with
    assert len(args) == 1 and args[0] is mask and kwargs == {"flag": True}
    with pytest.raises(GuardmergeError):  # taken once: no tensors outlive the forward
        point.take()
    assert Capture(tuple_output=True)(hidden)[0] is hidden


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_families_branch_and_export(family: str, tmp_path: Path) -> None:
    base, (e0, e1) = family_zoo(tmp_path, family)
    experts = [{"model": str(e0), "task": "t0"}, {"model": str(e1), "task": "t1"}]
    zero = parse_config({"base_model": str(base), "experts": experts, "share_layers": 0})
    model = merge(MergeJob.of(zero), progress=False).to_model()
    assert torch.allclose(model.logits(TEXTS)["t1"], expert_logits(e1), atol=1e-5)
    one = merge(
        MergeJob.of(parse_config({"base_model": str(base), "experts": experts, "share_layers": 1})), progress=False
    )
    m1 = one.to_model()
    torch.manual_seed(0)
    m1.branch("t1").set_align(1 + 0.1 * torch.randn(16), 0.1 * torch.randn(16))
    m1.export_task("t1", tmp_path / "exp")
    assert torch.allclose(expert_logits(tmp_path / "exp"), m1.logits(TEXTS)["t1"], atol=1e-5)


def test_per_task_depths_run_the_trunk_once_and_branch_inside_it(zoo: dict[str, Path]) -> None:
    cfg = zoo_merge_config(zoo, share_layers={"default": 1, "hate": LAYERS})
    mixed = merge(MergeJob.of(cfg), progress=False).to_model()
    assert "hate" not in mixed.branches and mixed.depth("hate") == LAYERS and mixed.depth("injection") == 1
    assert mixed.trunk_blocks == LAYERS and mixed.trunk_cut is None
    trunk = list(mixed.encoder.encoder.layer)
    assert len(trunk) == LAYERS and not any(isinstance(b, Capture) for b in trunk)  # the trunk runs whole
    calls: list[str] = []
    hooks = [b.register_forward_hook(lambda *a, i=i: calls.append(f"trunk{i}")) for i, b in enumerate(trunk)]
    try:
        mixed(**mixed.encode(TEXTS))
        assert calls.count("trunk0") == 1 and calls.count("trunk1") == 1  # once, whatever the tasks
    finally:
        for h in hooks:
            h.remove()
    assert all(not tap.calls for tap in mixed.taps.values())  # every branch point taken
    with pytest.raises(GuardmergeError, match="needs a trunk cut"):  # every head branched on a whole trunk
        MultiHeadModel(
            mixed.encoder,
            {t: mixed.head(t) for t in ("injection",)},
            mixed.config,
            branches={"injection": mixed.branch("injection")},
        )


def test_a_branched_model_is_refused_clearly_under_transformers_4(
    branched: MultiHeadModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLM Guard's environment pins transformers 4.51, whose blocks take and return other shapes:
    a sharing depth is refused by name there (a plain merged model loads: CI's LLM Guard step)."""
    import transformers

    from guardmerge.errors import CompatibilityError

    branched.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(transformers, "__version__", "4.51.3")
    with pytest.raises(CompatibilityError, match=r"share_layers: .*transformers >= 5\.9.*4\.51\.3"):
        guardmerge.load(tmp_path / "m")
