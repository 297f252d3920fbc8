"""Sharing depth (``share_layers: K``), the merge side: the trunk of K merged blocks, each task's own
blocks above it (guardmerge.merge.engine), the branch-alignment stage (guardmerge.merge.branches),
the layer-wise stage on the shared blocks, ONNX and serving of a branched model, refused settings.
The branched model itself (trunk, branches, save/load, export): tests/models/test_branches.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import guardmerge
from guardmerge.config import parse_config
from guardmerge.errors import ConfigError
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.merge.stages import build, merge_to_folder
from guardmerge.models.multihead import MultiHeadModel
from tests.builders import MERGED_TASKS, TEXTS, expert_logits, random_texts
from tests.builders import zoo_merge_config as config

TASKS = MERGED_TASKS
LAYERS = 2  # the conftest zoo's num_hidden_layers


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(random_texts(40)) + "\n")
    return path


@pytest.fixture(scope="module")
def branched(zoo: dict[str, Path]) -> MultiHeadModel:
    return merge(MergeJob.of(config(zoo, share_layers=1)), progress=False).to_model()


@pytest.fixture(scope="module")
def aligned(zoo: dict[str, Path], data_file: Path) -> MultiHeadModel:
    res = build(MergeJob.of(config(zoo, data_file, share_layers=1, branch_align=True)), progress=False)
    return res.to_model()


@pytest.fixture(scope="module")
def mixed(zoo: dict[str, Path]) -> MultiHeadModel:
    """Per-task depths: hate shares every block (no branch), the others branch after block 0."""
    return merge(MergeJob.of(config(zoo, share_layers={"default": 1, "hate": LAYERS})), progress=False).to_model()


def test_share_layers_0_reproduces_every_expert(zoo: dict[str, Path]) -> None:
    res = merge(MergeJob.of(config(zoo, share_layers=0)), progress=False)
    assert "branches.hate.embeddings.word_embeddings.weight" in res.tensors
    model = res.to_model()
    plain = merge(MergeJob.of(config(zoo)), progress=False).to_model().logits(TEXTS)
    got = model.logits(TEXTS)
    for t in TASKS:
        ref = expert_logits(zoo[t])
        assert (plain[t] - ref).abs().max() > 1e-3  # the single-pass merge is not the expert
        assert torch.allclose(got[t], ref, atol=1e-5), t


def test_share_layers_L_equals_the_single_pass_merge(zoo: dict[str, Path]) -> None:
    full = merge(MergeJob.of(config(zoo, share_layers=LAYERS)), progress=False)
    plain = merge(MergeJob.of(config(zoo)), progress=False)
    assert sorted(full.tensors) == sorted(plain.tensors)
    assert not any(k.startswith("branches.") for k in full.tensors)
    assert full.info["share_layers"] == LAYERS
    a, b = full.to_model(), plain.to_model()
    assert a.share_layers is None and not a.branches
    la, lb = a.logits(TEXTS), b.logits(TEXTS)
    assert all(torch.equal(la[t], lb[t]) for t in TASKS)


def _reference(zoo: dict[str, Path], task: str, trunk_model: MultiHeadModel, depth: int) -> torch.Tensor:
    """The expert with its embeddings and blocks < depth replaced by the merged ones."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    expert = AutoModelForSequenceClassification.from_pretrained(str(zoo[task])).eval()
    shared = {
        k: v
        for k, v in trunk_model.encoder.state_dict().items()
        if k.startswith("embeddings.") or any(k.startswith(f"encoder.layer.{i}.") for i in range(depth))
    }
    missing, unexpected = expert.bert.load_state_dict(shared, strict=False)
    assert not unexpected and not any(m.startswith("embeddings.word") for m in missing)
    tok = AutoTokenizer.from_pretrained(str(zoo[task]))
    with torch.no_grad():
        return expert(**tok(TEXTS, padding=True, return_tensors="pt")).logits


def test_branched_logits_are_the_experts_blocks_on_the_merged_trunk(
    zoo: dict[str, Path], branched: MultiHeadModel
) -> None:
    plain = merge(MergeJob.of(config(zoo)), progress=False).to_model()  # same shared tensors (per-tensor method)
    got = branched.logits(TEXTS)
    for t in TASKS:
        ref = _reference(zoo, t, plain, depth=1)
        assert torch.allclose(got[t], ref, atol=1e-5), t
        assert (got[t] - expert_logits(zoo[t])).abs().max() > 1e-4  # the trunk is merged, not the expert's


def test_streamed_folder_equals_the_in_memory_merge(
    zoo: dict[str, Path], branched: MultiHeadModel, tmp_path: Path
) -> None:
    out = merge_to_folder(MergeJob.of(config(zoo, share_layers=1)), tmp_path / "s", progress=False)
    loaded = guardmerge.load(out)
    a, b = branched.logits(TEXTS), loaded.logits(TEXTS)
    assert all(torch.allclose(a[t], b[t], atol=1e-6) for t in TASKS)


def test_branch_align_fits_and_exports(aligned: MultiHeadModel, branched: MultiHeadModel, tmp_path: Path) -> None:
    report = aligned.info["branch_align"]
    assert report["share_layers"] == 1
    for t in TASKS:
        r = report["tasks"][t]
        assert r["mse_after"] < r["mse_before"]
        scale = aligned.branch(t).align.scale  # type: ignore[union-attr]
        assert not torch.allclose(scale, torch.ones_like(scale))
    # the align moves the logits, and a stock export reproduces the aligned model
    assert not torch.allclose(aligned.logits(TEXTS)["hate"], branched.logits(TEXTS)["hate"], atol=1e-5)
    out = aligned.export_task("hate", tmp_path / "hate")
    assert torch.allclose(expert_logits(out), aligned.logits(TEXTS)["hate"], atol=1e-5)
    aligned.save_pretrained(tmp_path / "m")
    loaded = guardmerge.load(tmp_path / "m")
    assert torch.allclose(loaded.logits(TEXTS)["sentiment"], aligned.logits(TEXTS)["sentiment"], atol=1e-6)


def test_layerwise_solves_only_the_shared_blocks(zoo: dict[str, Path], data_file: Path) -> None:
    cfg = config(zoo, data_file, share_layers=1, method="lot", parameters={"texts": 20})
    res = build(MergeJob.of(cfg), progress=False)
    assert res.info["layerwise"]["layers"] == 6  # q, k, v, attention output, intermediate, output of block 0
    plain = merge(MergeJob.of(cfg), progress=False)
    assert not torch.equal(
        res.tensors["encoder.layer.0.attention.self.query.weight"],
        plain.tensors["encoder.layer.0.attention.self.query.weight"],
    )
    for name, tensor in plain.tensors.items():
        if name.startswith("branches."):
            assert torch.equal(res.tensors[name], tensor), name  # each task's own blocks untouched


@pytest.mark.parametrize("which", ["aligned", "mixed"])
def test_onnx_export_of_a_branched_model_matches_torch(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    from guardmerge.export.metadata import ONNX_FILE
    from guardmerge.export.onnx import export_onnx

    source: MultiHeadModel = request.getfixturevalue(which)
    source.save_pretrained(tmp_path / "m")
    model = guardmerge.load(tmp_path / "m")  # with its tokenizer
    out = export_onnx(model, tmp_path / "onnx")
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [f"logits_{t}" for t in TASKS]
    for texts in (TEXTS, TEXTS[:1], [" ".join(TEXTS), "sure"]):
        enc = model.encode(texts)
        outs = session.run(None, {k: v.numpy() for k, v in enc.items()})
        ref = model.logits(texts)
        for got, t in zip(outs, TASKS):
            np.testing.assert_allclose(got, ref[t].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["branched", "mixed"])
def test_serving_a_branched_model_returns_every_head(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    for extra in ("fastapi", "uvicorn", "prometheus_client"):
        pytest.importorskip(extra)
    httpx = pytest.importorskip("httpx")
    from guardmerge.serve import ServeSettings, create_app
    from tests.serve.conftest import running

    source: MultiHeadModel = request.getfixturevalue(which)
    source.save_pretrained(tmp_path / "m")
    model = guardmerge.load(tmp_path / "m")
    expected = model.predict(TEXTS)
    with running(create_app(model, ServeSettings(benign={"sentiment": ["neu"]}))) as url:
        res = httpx.post(f"{url}/v1/classify", json={"texts": TEXTS}, timeout=30)
    assert res.status_code == 200, res.text
    rows = res.json()["results"]
    assert len(rows) == len(TEXTS)
    for i, row in enumerate(rows):
        assert set(row["heads"]) == set(TASKS)
        for t in TASKS:
            assert row["heads"][t]["label"] == expected[t][i]["label"]
            assert row["heads"][t]["score"] == pytest.approx(expected[t][i]["score"], abs=1e-5)


def test_share_layers_above_the_layer_count_is_refused(zoo: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="share_layers is 3 but the base .* has 2 layers"):
        merge(MergeJob.of(config(zoo, share_layers=3)), progress=False)


def test_bad_sharing_configs_are_refused(zoo: dict[str, Path], data_file: Path) -> None:
    experts = [{"model": "m", "task": "hate", "data": str(data_file)}, {"model": "m2", "task": "spam"}]
    with pytest.raises(ConfigError, match=r"branch_align needs unlabelled texts.*expert\(s\) spam"):
        MergeJob.of(parse_config({"base_model": "b", "experts": experts, "share_layers": 1, "branch_align": True}))
    with pytest.raises(ConfigError, match="branch_align .* set share_layers"):
        MergeJob.of(parse_config({"base_model": "b", "experts": experts[:1], "branch_align": True}))
    with pytest.raises(ConfigError, match="share_layers .* use heads: multi"):
        MergeJob.of(parse_config({"base_model": "b", "experts": experts[:1], "share_layers": 1, "heads": "hm3"}))
    with pytest.raises(ConfigError, match="share_layers"):
        parse_config({"base_model": "b", "experts": experts[:1], "share_layers": -1})


def test_per_task_depths_reproduce_the_uniform_models_and_survive_save_load(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    depths = {"default": 1, "hate": LAYERS}
    res = merge(MergeJob.of(config(zoo, share_layers=depths)), progress=False)
    assert res.info["share_layers"] == {"hate": LAYERS, "injection": 1, "sentiment": 1}
    assert res.info["blocks_per_pass"] == LAYERS + 2 * (LAYERS - 1)
    assert not any(k.startswith("branches.hate.") for k in res.tensors)
    assert "pooler.dense.weight" in res.tensors  # the trunk runs whole: hate reads its top
    mixed = res.to_model()
    assert mixed.share_layers == {"hate": LAYERS, "injection": 1, "sentiment": 1}
    assert mixed.blocks_per_pass == LAYERS + 2 * (LAYERS - 1)
    at_k = merge(MergeJob.of(config(zoo, share_layers=1)), progress=False).to_model().logits(TEXTS)
    at_l = merge(MergeJob.of(config(zoo)), progress=False).to_model().logits(TEXTS)
    got = mixed.logits(TEXTS)
    assert (at_k["hate"] - at_l["hate"]).abs().max() > 1e-3  # the two references differ
    assert torch.allclose(got["hate"], at_l["hate"], atol=1e-5)
    for t in ("injection", "sentiment"):
        assert (at_k[t] - at_l[t]).abs().max() > 1e-3
        assert torch.allclose(got[t], at_k[t], atol=1e-5), t
    mixed.save_pretrained(tmp_path / "m")
    loaded = guardmerge.load(tmp_path / "m")
    assert loaded.share_layers == mixed.share_layers
    again = loaded.logits(TEXTS)
    assert all(torch.allclose(again[t], got[t], atol=1e-6) for t in TASKS)


def test_per_task_depths_are_checked_naming_the_field(zoo: dict[str, Path]) -> None:
    experts = [{"model": "m", "task": t} for t in ("hate", "injection")]
    with pytest.raises(ConfigError, match=r"share_layers: unknown task\(s\) emotion"):
        MergeJob.of(parse_config({"base_model": "b", "experts": experts, "share_layers": {"default": 1, "emotion": 0}}))
    with pytest.raises(ConfigError, match=r"share_layers: no depth for task\(s\) injection; add 'default"):
        MergeJob.of(parse_config({"base_model": "b", "experts": experts, "share_layers": {"hate": 1}}))
    with pytest.raises(ConfigError, match=r"share_layers\..*hate: Input should be greater than or equal to 0"):
        parse_config({"base_model": "b", "experts": experts, "share_layers": {"hate": -1, "default": 1}})
    named = parse_config({"base_model": "b", "experts": experts, "share_layers": {"hate": 0, "injection": 2}})
    assert named.share_depths() == {"hate": 0, "injection": 2}
    assert parse_config({"base_model": "b", "experts": experts, "share_layers": 1}).share_depths() == {
        "hate": 1,
        "injection": 1,
    }
    with pytest.raises(ConfigError, match="share_layers.sentiment is 3 but the base .* has 2 layers"):
        merge(MergeJob.of(config(zoo, share_layers={"default": 1, "sentiment": 3})), progress=False)
