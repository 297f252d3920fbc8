"""The multi-head artifact: predict, save/load, single-task export, other architectures."""

from pathlib import Path

import pytest
import torch

import guardmerge
from guardmerge.config import parse_config
from guardmerge.errors import GuardmergeError
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.models.multihead import MultiHeadModel
from tests.builders import TEXTS, expert_logits, write_tokenizer


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
    return merge(MergeJob.of(c), progress=False).to_model()


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


# -- issue 21: what a merged folder may hold, and outputs that are not finite ---------------------


def _edit_folder(folder: Path, tensors=None, config=None) -> None:  # type: ignore[no-untyped-def]
    import json

    from safetensors.torch import load_file, save_file

    if tensors is not None:
        state = load_file(str(folder / "model.safetensors"))
        tensors(state)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        data = json.loads((folder / "config.json").read_text())
        config(data)
        (folder / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("tensors", "config", "problem"),
    [
        (
            lambda s: s.__setitem__("heads.hate.classifier.weight", s["heads.hate.classifier.weight"].to(torch.int8)),
            None,
            "quantised",
        ),
        (
            lambda s: s.__setitem__("heads.hate.classifier.bias", s["heads.hate.classifier.bias"] > 0),
            None,
            "floating point",
        ),
        (
            lambda s: s.__setitem__(
                "encoder.layer.0.output.dense.weight", s["encoder.layer.0.output.dense.weight"].to(torch.float8_e4m3fn)
            ),
            None,
            "quantised",
        ),
        (None, lambda c: c.__setitem__("quantization_config", {"quant_method": "bitsandbytes"}), "quantised"),
        (None, lambda c: c.__setitem__("num_hidden_layers", 20000), "num_hidden_layers is 20000"),
        (
            None,
            lambda c: c["guardmerge"]["heads"].__setitem__("hate\n", c["guardmerge"]["heads"].pop("hate")),
            "not a valid task name",
        ),
        (None, lambda c: c.__setitem__("auto_map", {"AutoModel": "evil.Model"}), "auto_map"),
    ],
)
def test_load_refuses_what_a_merged_folder_may_not_hold(
    merged: MultiHeadModel,
    tmp_path: Path,
    tensors,
    config,
    problem: str,  # type: ignore[no-untyped-def]
) -> None:
    import time

    from guardmerge.errors import CheckpointError

    folder = merged.save_pretrained(tmp_path / "m")
    _edit_folder(folder, tensors, config)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=problem):
        guardmerge.load(folder)
    assert time.perf_counter() - started < 10  # refused before building 20,000 layers


def test_predict_refuses_non_finite_outputs(merged: MultiHeadModel) -> None:
    from guardmerge.errors import NonFiniteOutputError

    broken = MultiHeadModel(merged.encoder, dict(merged.heads), merged.config, merged.info, merged.tokenizer)
    original = broken.heads["hate"].layers[-1].bias.detach().clone()
    try:
        with torch.no_grad():
            broken.heads["hate"].layers[-1].bias.fill_(float("inf"))
            broken.heads["hate"].layers[-1].bias[0] = float("-inf")  # inf - inf: NaN probabilities
        with pytest.raises(NonFiniteOutputError, match="head 'hate'"):
            broken.predict(TEXTS)
        with pytest.raises(NonFiniteOutputError):
            broken.logits(TEXTS, tasks=["hate"])
        assert set(broken.logits(TEXTS, tasks=["injection"])) == {"injection"}  # other heads still answer
    finally:
        with torch.no_grad():
            broken.heads["hate"].layers[-1].bias.copy_(original)


def test_predict_cli_exits_2_on_non_finite_outputs(
    tmp_path: Path, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from guardmerge.cli import main

    folder = _scaled_merge(zoo, tmp_path, probe=False)
    monkeypatch.setattr(sys, "argv", ["guardmerge", "predict", str(folder), "hello there"])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "NaN or infinite" in err and "Traceback" not in err


def _scaled_merge(zoo: dict[str, Path], tmp_path: Path, probe: bool) -> Path:
    """A merge at scaling 1e38 (finite weights, overflowing activations); ``probe=False`` skips
    the merge's own output check, to build the folder a user must never get."""
    from guardmerge.merge import write as engine
    from guardmerge.merge.stages import merge_to_folder

    cfg = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo["hate"]), "task": "hate"}],
            "parameters": {"scaling": 1e38},
            "align_heads": False,
        }
    )
    if probe:
        return merge_to_folder(MergeJob.of(cfg), tmp_path / "scaled", progress=False)
    original = engine.probe_outputs
    engine.probe_outputs = lambda *a, **k: None  # type: ignore[assignment]
    try:
        return merge_to_folder(MergeJob.of(cfg), tmp_path / "scaled", progress=False)
    finally:
        engine.probe_outputs = original


def test_a_merge_whose_outputs_overflow_is_refused_before_it_is_written(tmp_path: Path, zoo: dict[str, Path]) -> None:
    with pytest.raises(GuardmergeError, match="not finite on probe texts"):
        _scaled_merge(zoo, tmp_path, probe=True)
    assert list(tmp_path.iterdir()) == []
