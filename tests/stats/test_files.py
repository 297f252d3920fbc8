"""Statistics files: round trip with metadata, fingerprints, refusal of another expert's file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from guardmerge import __version__
from guardmerge.errors import CheckpointError, StatisticsError
from guardmerge.stats import (
    StackedStats,
    collect_fisher,
    collect_grams,
    derive_fingerprint,
    expert_fingerprint,
    load_stats,
    read_stats_metadata,
    save_stats,
    stack_for_tensor,
)
from tests.stats.conftest import make_batch, tiny_model

Q = "encoder.layer.0.attention.self.query.weight"
K = "encoder.layer.0.attention.self.key.weight"


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experts")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        tiny_model("bert", num_labels=2, seed=seed).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def stats_of_a(experts: dict[str, Path]):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_model("bert", num_labels=2, seed=0)
    batches = [make_batch([5, 3, 4], seed=1, num_labels=2)]
    gram = collect_grams(model, batches, max_length=16, progress=False)
    fisher = collect_fisher(model, batches, label_mode="soft", max_length=16, progress=False)
    torch.set_num_threads(before)
    return gram, fisher


def test_round_trip_with_metadata(tmp_path: Path, experts, stats_of_a) -> None:
    gram, fisher = stats_of_a
    path = save_stats(
        tmp_path / "a.stats.safetensors",
        gram=gram,
        fisher=fisher,
        expert=experts["a"],
        extra={"data": "train.jsonl", "n": 3},
    )
    loaded = load_stats(path, experts["a"])
    assert loaded.kinds == {"gram", "fisher"}
    assert loaded.fingerprint == expert_fingerprint(experts["a"])
    assert loaded.extra == {"data": "train.jsonl", "n": "3"}
    g = loaded.gram
    assert g is not None and g.weight_to_gram == gram.weight_to_gram
    assert g.weight_to_gram[K] == Q
    assert g.tokens == gram.tokens and g.head == gram.head == {"classifier.weight"}
    assert (g.n_examples, g.n_tokens, g.include_padding, g.max_length) == (3, 12, False, 16)
    for key, t in gram.grams.items():
        assert g.grams[key].dtype == torch.float64
        assert torch.equal(g.grams[key], t)
    f = loaded.fisher
    assert f is not None and (f.n_examples, f.label_mode, f.gradient, f.max_length) == (3, "soft", "per_example", 16)
    assert f.head == {"classifier.weight", "classifier.bias"}
    for name, t in fisher.fisher.items():
        assert torch.equal(f.fisher[name], t)
    assert set(loaded.for_tensor(Q)) == {"gram", "fisher"}
    assert set(loaded.for_tensor("encoder.layer.0.attention.self.query.bias")) == {"fisher"}

    meta = read_stats_metadata(path)
    assert meta["format"] == "guardmerge-stats" and meta["guardmerge_version"] == __version__
    assert json.loads(meta["kinds"]) == ["gram", "fisher"]
    assert json.loads(meta["max_length"]) == 16
    assert json.loads(meta["gram.map"])[K] == Q
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
    assert f"gram/{Q}" in keys and f"gram/{K}" not in keys  # q/k/v stored once
    assert f"fisher/{K}" in keys


def test_only_requested_kinds_and_float32_grams(tmp_path: Path, experts, stats_of_a) -> None:
    gram, _ = stats_of_a
    path = save_stats(tmp_path / "g.safetensors", gram=gram, expert=experts["a"], gram_dtype=torch.float32)
    loaded = load_stats(path, experts["a"])
    assert loaded.kinds == {"gram"} and loaded.gram.grams[Q].dtype == torch.float32
    with pytest.raises(StatisticsError, match="no 'fisher' statistics"):
        load_stats(path, kinds=["fisher"])


def test_stats_of_another_expert_are_refused(tmp_path: Path, experts, stats_of_a) -> None:
    gram, _ = stats_of_a
    path = save_stats(tmp_path / "a.safetensors", gram=gram, expert=experts["a"])
    with pytest.raises(StatisticsError) as err:
        load_stats(path, experts["b"])
    message = str(err.value)
    assert str(path) in message and str(experts["b"]) in message
    assert "another expert" in message
    # the fingerprint can also be given directly (derived experts, e.g. DARE-sparsified)
    derived = derive_fingerprint(expert_fingerprint(experts["a"]), dare_density=0.5, seed=0)
    dpath = save_stats(tmp_path / "d.safetensors", gram=gram, fingerprint=derived)
    assert load_stats(dpath, fingerprint=derived).fingerprint == derived
    with pytest.raises(StatisticsError):
        load_stats(dpath, experts["a"])


def test_fingerprint_is_stable_and_sensitive(tmp_path: Path, experts) -> None:
    fa, fb = expert_fingerprint(experts["a"]), expert_fingerprint(experts["b"])
    assert fa.startswith("gmfp1:") and fa != fb
    copy = tmp_path / "copy"
    shutil.copytree(experts["a"], copy)
    assert expert_fingerprint(copy) == fa
    cfg = json.loads((copy / "config.json").read_text())
    cfg["transformers_version"] = "0.0.1"  # volatile: ignored
    (copy / "config.json").write_text(json.dumps(cfg, indent=4))
    assert expert_fingerprint(copy) == fa
    cfg["id2label"] = {"0": "x", "1": "y"}
    (copy / "config.json").write_text(json.dumps(cfg))
    assert expert_fingerprint(copy) != fa
    # a changed head tensor changes it too
    other = tmp_path / "other"
    shutil.copytree(experts["a"], other)
    from safetensors.torch import load_file

    tensors = load_file(str(other / "model.safetensors"))
    tensors["classifier.bias"] = tensors["classifier.bias"] + 1.0
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert expert_fingerprint(other) != fa
    with pytest.raises(CheckpointError):
        expert_fingerprint(tmp_path / "missing")


def test_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StatisticsError, match="not found"):
        load_stats(tmp_path / "none.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(StatisticsError, match="not a guardmerge statistics file"):
        load_stats(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(StatisticsError, match="not a readable safetensors"):
        load_stats(junk)
    with pytest.raises(StatisticsError, match="nothing to save"):
        save_stats(tmp_path / "x.safetensors", fingerprint="f")


def test_stack_for_tensor(stats_of_a, tmp_path: Path, experts) -> None:
    gram, fisher = stats_of_a
    path = save_stats(tmp_path / "s.safetensors", gram=gram, fisher=fisher, expert=experts["a"])
    one, two = load_stats(path), load_stats(path)
    stacked = stack_for_tensor([one, two], K, {"gram", "fisher"})
    assert stacked["gram"].shape == (2, 16, 16) and stacked["fisher"].shape == (2, 16, 16)
    assert stack_for_tensor([one, two], "encoder.layer.0.attention.self.key.bias", {"gram"}) == {}
    only_fisher = load_stats(path, kinds=["fisher"])
    with pytest.raises(StatisticsError, match="missing"):
        stack_for_tensor([one, only_fisher], K, {"gram"})


def test_stacked_stats_is_a_lazy_engine_table(stats_of_a, tmp_path: Path, experts) -> None:
    gram, fisher = stats_of_a
    path = save_stats(tmp_path / "s.safetensors", gram=gram, fisher=fisher, expert=experts["a"])
    one, two = load_stats(path), load_stats(path)
    table = StackedStats([one, two], {"gram"})
    assert K in table and "classifier.weight" in table and len(table) == len(gram.weight_to_gram)
    assert table[K]["gram"].shape == (2, 16, 16)
    assert torch.equal(table[K]["gram"][0], table[Q]["gram"][1])  # k reads q's shared Gram
    assert table.get("embeddings.word_embeddings.weight", {}) == {}
    both = StackedStats([one, two], {"gram", "fisher"})
    assert set(both["encoder.layer.0.attention.self.query.bias"]) == {"fisher"}
