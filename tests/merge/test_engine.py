"""End-to-end merges of tiny random BERTs: hand computations, exactness, and refusals."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from guardmerge.config import MergeConfig, load_config, parse_config
from guardmerge.errors import (
    CheckpointError,
    CompatibilityError,
    ConfigError,
    GuardmergeError,
    OutputExistsError,
)
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.merge.stages import merge_to_folder
from guardmerge.models.multihead import MultiHeadModel
from tests.builders import TEXTS, copy_expert, edit_weights, expert_logits, make_base, make_expert, merge_cfg

Q = "encoder.layer.0.attention.self.query.weight"


def cfg(zoo: dict[str, Path], tasks=("hate", "sentiment"), method="task_arithmetic", **params):
    return parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo[t]), "task": t} for t in tasks],
            "method": method,
            "parameters": params,
        }
    )


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(folder / "model.safetensors"))
    return {k.removeprefix("bert."): v for k, v in state.items()}


def test_task_arithmetic_matches_hand_computation(zoo: dict[str, Path]) -> None:
    res = merge(MergeJob.of(cfg(zoo, scaling=0.7)), progress=False)
    b, h, s = tensors(zoo["base"]), tensors(zoo["hate"]), tensors(zoo["sentiment"])
    expected = b[Q].double() + 0.7 * ((h[Q] - b[Q]).double() + (s[Q] - b[Q]).double())
    assert torch.allclose(res.tensors[Q].double(), expected, atol=1e-6)


def test_average_matches_hand_computation(zoo: dict[str, Path]) -> None:
    c = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [
                {"model": str(zoo["hate"]), "task": "hate", "weight": 3.0},
                {"model": str(zoo["sentiment"]), "task": "sentiment", "weight": 1.0},
            ],
            "method": "average",
        }
    )
    res = merge(MergeJob.of(c), progress=False)
    h, s = tensors(zoo["hate"]), tensors(zoo["sentiment"])
    assert torch.allclose(res.tensors[Q], (3 * h[Q] + s[Q]) / 4, atol=1e-6)
    # heads are kept per task, unchanged
    assert torch.equal(res.tensors["heads.hate.classifier.weight"], h["classifier.weight"])
    assert torch.equal(res.tensors["heads.sentiment.classifier.bias"], s["classifier.bias"])


def test_one_expert_scaling_one_reproduces_the_expert_exactly(zoo: dict[str, Path]) -> None:
    for task in ("hate", "sentiment"):
        model = merge(MergeJob.of(cfg(zoo, tasks=(task,), scaling=1.0)), progress=False).to_model()
        ours = model.logits(TEXTS)[task]
        ref = expert_logits(zoo[task])
        assert torch.allclose(ours, ref, atol=1e-6)
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_scaling_zero_gives_the_base_encoder(zoo: dict[str, Path]) -> None:
    res = merge(MergeJob.of(cfg(zoo, scaling=0.0)), progress=False)
    b = tensors(zoo["base"])
    assert all(torch.equal(res.tensors[k], b[k]) for k in b if not k.endswith("position_ids") and k in res.tensors)


def test_merged_folder_contents(zoo: dict[str, Path], tmp_path: Path) -> None:
    out = merge_to_folder(MergeJob.of(cfg(zoo, scaling=0.5)), tmp_path / "out", progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "merge_config.yaml", "README.md", "tokenizer_config.json"} <= names
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and "scaling=0.5" in card and str(zoo["base"]) in card and "0.1.0" in card
    model = MultiHeadModel.from_pretrained(out)
    assert model.tasks == ["hate", "sentiment"]
    assert model.labels("sentiment") == ["neg", "neu", "pos"]
    assert model.info["method"] == "task_arithmetic"


def _no_output(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def broken(tmp_path_factory: pytest.TempPathFactory, zoo: dict[str, Path]) -> dict[str, Path]:
    """Experts that must be refused, one per failure."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    wide_base = make_base(root / "wide_base", hidden_size=24, intermediate_size=32, num_attention_heads=2)
    out["hidden"] = make_expert(root / "hidden", wide_base, ["a", "b"], seed=5)
    out["vocab"] = make_expert(
        root / "vocab",
        zoo["base"],
        ["a", "b"],
        seed=6,
        words=["x" + w for w in __import__("tests.builders").builders.WORDS],
    )
    missing = root / "missing"
    shutil.copytree(zoo["hate"], missing)
    state = load_file(str(missing / "model.safetensors"))
    del state["bert.encoder.layer.1.output.dense.weight"]
    from safetensors.torch import save_file

    save_file(state, str(missing / "model.safetensors"))
    out["missing"] = missing
    corrupt = root / "corrupt"
    shutil.copytree(zoo["hate"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"garbage" * 10)
    out["corrupt"] = corrupt
    pickled = root / "pickled"
    shutil.copytree(zoo["hate"], pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    out["pickled"] = pickled
    return out


@pytest.mark.parametrize(
    "case, error, pattern",
    [
        (
            "hidden",
            CompatibilityError,
            r"expert 'bad'.*hidden.*config field 'hidden_size' is 24 but the base .* has 16",
        ),
        ("vocab", CompatibilityError, r"expert 'bad'.*different vocabulary"),
        ("missing", CompatibilityError, r"expert 'bad'.*missing encoder tensor 'encoder.layer.1.output.dense.weight'"),
        ("corrupt", CheckpointError, r"corrupt/model.safetensors is not a readable safetensors file"),
        ("pickled", CheckpointError, r"pickled/pytorch_model.bin is a pickle checkpoint"),
    ],
)
def test_bad_expert_is_refused_and_leaves_no_output(
    zoo: dict[str, Path], broken: dict[str, Path], tmp_path: Path, case: str, error: type, pattern: str
) -> None:
    c = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo["hate"]), "task": "hate"}, {"model": str(broken[case]), "task": "bad"}],
            "method": "task_arithmetic",
        }
    )
    out = tmp_path / "out"
    with pytest.raises(error, match=pattern):
        merge_to_folder(MergeJob.of(c), out, progress=False)
    _no_output(tmp_path, out)


def test_pickle_allowed_with_flag(zoo: dict[str, Path], broken: dict[str, Path]) -> None:
    c = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(broken["pickled"]), "task": "hate"}],
            "method": "task_arithmetic",
            "parameters": {"scaling": 1.0},
            "allow_pickle": True,
        }
    )
    model = merge(MergeJob.of(c), progress=False).to_model()
    assert torch.allclose(model.logits(TEXTS)["hate"], expert_logits(zoo["hate"]), atol=1e-6)


def test_existing_output_is_refused_before_any_work(zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists.*--force"):
        merge_to_folder(MergeJob.of(cfg(zoo)), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    merge_to_folder(MergeJob.of(cfg(zoo)), out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_headless_expert_is_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    c = parse_config({"base_model": str(zoo["base"]), "experts": [{"model": str(zoo["base"]), "task": "x"}]})
    with pytest.raises(CompatibilityError, match="no classification head tensor 'classifier.weight'"):
        merge_to_folder(MergeJob.of(c), tmp_path / "o", progress=False)
    _no_output(tmp_path, tmp_path / "o")


def test_all_errors_share_one_base_type() -> None:
    for err in (CheckpointError, CompatibilityError, ConfigError, OutputExistsError):
        assert issubclass(err, GuardmergeError)


def test_masked_lm_base_keeps_each_experts_pooler_in_its_head(tmp_path: Path, zoo: dict[str, Path]) -> None:
    from transformers import BertForMaskedLM, BertModel

    mlm = tmp_path / "mlm"
    model = BertForMaskedLM.from_pretrained(str(zoo["base"]))  # no pooler in a masked LM
    model.bert.load_state_dict(BertModel.from_pretrained(str(zoo["base"])).state_dict(), strict=False)
    model.save_pretrained(str(mlm), safe_serialization=True)
    shutil.copy(zoo["base"] / "tokenizer.json", mlm / "tokenizer.json")
    shutil.copy(zoo["base"] / "tokenizer_config.json", mlm / "tokenizer_config.json")
    c = parse_config(
        {
            "base_model": str(mlm),
            "experts": [{"model": str(zoo["hate"]), "task": "hate"}],
            "parameters": {"scaling": 1.0},
        }
    )
    res = merge(MergeJob.of(c), progress=False)
    assert res.heads["hate"].layers == ("pooler.dense", "classifier")
    m = res.to_model()
    assert torch.allclose(m.logits(TEXTS)["hate"], expert_logits(zoo["hate"]), atol=1e-6)
    # and the single-task export is a stock classifier again
    m.export_task("hate", tmp_path / "exp")
    assert torch.allclose(expert_logits(tmp_path / "exp"), expert_logits(zoo["hate"]), atol=1e-6)


def test_hm3_heads_are_merged_zero_padded_blocks(zoo: dict[str, Path]) -> None:
    c = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo[t]), "task": t} for t in ("hate", "sentiment")],
            "method": "task_arithmetic",
            "parameters": {"scaling": 0.6},
            "heads": "hm3",
        }
    )
    res = merge(MergeJob.of(c), progress=False)
    h, s = tensors(zoo["hate"]), tensors(zoo["sentiment"])
    # all-zero base head + 0.6 * (padded hate + padded sentiment): each block is 0.6 x its own head
    assert torch.allclose(res.tensors["heads.hate.classifier.weight"], 0.6 * h["classifier.weight"], atol=1e-6)
    assert torch.allclose(res.tensors["heads.sentiment.classifier.bias"], 0.6 * s["classifier.bias"], atol=1e-6)
    assert res.to_model().labels("sentiment") == ["neg", "neu", "pos"]


def test_hm3_sparsification_touches_heads(zoo: dict[str, Path]) -> None:
    c = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo[t]), "task": t} for t in ("hate", "sentiment")],
            "method": "ties",
            "parameters": {"density": 0.2, "scope": "per_tensor"},
            "heads": "hm3",
        }
    )
    w = merge(MergeJob.of(c), progress=False).tensors["heads.sentiment.classifier.weight"]
    kept = (w != 0).float().mean()
    assert 0 < kept < 0.6  # most head entries trimmed, as the paper's mode requires


def test_one_expert_hm3_with_scaling_one_is_the_expert(zoo: dict[str, Path]) -> None:
    c = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [{"model": str(zoo["sentiment"]), "task": "sentiment"}],
            "parameters": {"scaling": 1.0},
            "heads": "hm3",
        }
    )
    model = merge(MergeJob.of(c), progress=False).to_model()
    assert torch.allclose(model.logits(TEXTS)["sentiment"], expert_logits(zoo["sentiment"]), atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs", "pcb"])
def test_self_merge_at_density_one_reproduces_the_expert(zoo: dict[str, Path], method: str) -> None:
    from guardmerge.merge.stages import self_merge_config

    params = {"density": 1.0, "scaling": 1.0}
    if method == "breadcrumbs":
        params["gamma"] = 0.0
    if method == "pcb":
        params["clip"] = 0.0
    cfg = self_merge_config(str(zoo["base"]), str(zoo["hate"]), method, params, task="hate")
    model = merge(MergeJob.of(cfg), progress=False).to_model()
    ours, ref = model.logits(TEXTS)["hate"], expert_logits(zoo["hate"])
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "pcb"])
def test_streamed_sharded_output_equals_the_in_memory_merge(zoo: dict[str, Path], tmp_path: Path, method: str) -> None:
    from guardmerge.io.checkpoint import read_tensors
    from guardmerge.io.formats import SAFETENSORS_INDEX as INDEX_FILE

    config = cfg(zoo, tasks=("hate", "injection", "sentiment"), method=method)
    in_memory = merge(MergeJob.of(config), progress=False).tensors
    merge_to_folder(MergeJob.of(config), tmp_path / "m", progress=False, max_shard_bytes=4000)
    assert (tmp_path / "m" / INDEX_FILE).is_file() and len(list((tmp_path / "m").glob("model-*.safetensors"))) > 2
    streamed = read_tensors(tmp_path / "m")
    assert list(streamed) and set(streamed) == set(in_memory)
    assert all(torch.equal(streamed[k], v) for k, v in in_memory.items())
    model = MultiHeadModel.from_pretrained(tmp_path / "m")  # the sharded folder loads and predicts
    assert model.predict(TEXTS[:2])["sentiment"][0]["label"] in ("neg", "neu", "pos")


def test_out_dtype_and_compute_dtype(zoo: dict[str, Path], tmp_path: Path) -> None:
    from guardmerge.io.checkpoint import read_tensors

    config = cfg(zoo, scaling=0.5).model_copy(update={"out_dtype": "bfloat16"})
    merge_to_folder(MergeJob.of(config), tmp_path / "bf16", progress=False)
    out = read_tensors(tmp_path / "bf16")
    ref = merge(MergeJob.of(cfg(zoo, scaling=0.5)), progress=False).tensors
    assert out[Q].dtype == torch.bfloat16 and out["heads.hate.classifier.weight"].dtype == torch.bfloat16
    assert torch.equal(out[Q], ref[Q].to(torch.bfloat16))
    half = merge(MergeJob.of(cfg(zoo, scaling=0.5).model_copy(update={"dtype": "float16"})), progress=False).tensors
    assert half[Q].dtype == torch.float32 and 0 < float((half[Q] - ref[Q]).abs().max()) < 1e-3
    with pytest.raises(ConfigError):
        parse_config({**cfg(zoo).model_dump(), "out_dtype": "int8"})


def shared_cfg(base: Path, experts: list[Path], method: str = "task_arithmetic", **params) -> "MergeConfig":
    return parse_config(
        {
            "base_model": str(base),
            "experts": [{"model": str(e), "task": f"t{i}"} for i, e in enumerate(experts)],
            "method": method,
            "parameters": params,
            "heads": "shared",
        }
    )


def test_shared_heads_write_a_stock_classifier(zoo: dict[str, Path], tmp_path: Path) -> None:
    """Same-label experts merged whole (mergekit's use): the output is a stock transformers
    classifier; one expert at scaling 1 is reproduced exactly (its head merged against a zero
    head, the headless base having none)."""
    from transformers import AutoModelForSequenceClassification

    merge_to_folder(MergeJob.of(shared_cfg(zoo["base"], [zoo["hate"]], scaling=1.0)), tmp_path / "one", progress=False)
    assert torch.equal(expert_logits(tmp_path / "one"), expert_logits(zoo["hate"]))
    other = make_expert(tmp_path / "hate2", zoo["base"], ["not-hate", "hate"], seed=7)
    merge_to_folder(
        MergeJob.of(shared_cfg(zoo["base"], [zoo["hate"], other], scaling=0.5)), tmp_path / "two", progress=False
    )
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "two"))
    h, o = tensors(zoo["hate"]), tensors(other)
    expected = 0.5 * (h["classifier.weight"].double() + o["classifier.weight"].double())
    assert torch.allclose(model.classifier.weight.double(), expected, atol=1e-6)
    assert model.config.id2label == {0: "not-hate", 1: "hate"}
    assert "heads: shared" in (tmp_path / "two" / "README.md").read_text()


def test_shared_heads_refuse_different_label_sets_and_alignment(zoo: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CompatibilityError, match="heads: shared needs the same head|different label sets"):
        merge_to_folder(
            MergeJob.of(shared_cfg(zoo["base"], [zoo["hate"], zoo["sentiment"]])), tmp_path / "x", progress=False
        )
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="align_heads needs a multi-head output"):
        MergeJob.of(parse_config({**shared_cfg(zoo["base"], [zoo["hate"]]).model_dump(), "align_heads": True}))


def make_llama(folder: Path, seed: int, base: dict | None = None) -> tuple[Path, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    if base is not None:
        model.load_state_dict(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def test_llama_checkpoints_merge_whole_with_shared_heads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, b = make_llama(tmp_path / "base", 0)
    (e1, s1), (e2, s2) = make_llama(tmp_path / "e1", 1, b), make_llama(tmp_path / "e2", 2, b)
    merge_to_folder(
        MergeJob.of(shared_cfg(base, [e1, e2], "ties", density=0.5, scope="per_tensor")),
        tmp_path / "m",
        progress=False,
        max_shard_bytes=20_000,
    )
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    name = "model.layers.0.mlp.up_proj.weight"
    ref = merge(
        MergeJob.of(shared_cfg(base, [e1, e2], "ties", density=0.5, scope="per_tensor")), progress=False
    ).tensors
    assert torch.equal(model.state_dict()[name], ref[name]) and "lm_head.weight" in ref
    assert not torch.equal(ref[name], b[name]) and not torch.equal(ref[name], s1[name])
    ta = merge(MergeJob.of(shared_cfg(base, [e1, e2], scaling=0.5)), progress=False).tensors
    expected = b[name].double() + 0.5 * ((s1[name] - b[name]).double() + (s2[name] - b[name]).double())
    assert torch.allclose(ta[name].double(), expected, atol=1e-6)
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 64) and torch.isfinite(out).all()
    with pytest.raises(CompatibilityError, match="heads: shared"):
        merge(MergeJob.of(parse_config({**shared_cfg(base, [e1]).model_dump(), "heads": "multi"})), progress=False)


def test_outputs_never_alias_the_reused_input_buffers(zoo: dict[str, Path]) -> None:
    """A method answering in place (a view of its input rows) must not see its output
    overwritten when the reader refills the buffers with later tensors."""
    import dataclasses

    from guardmerge.merge.engine import TensorMerge

    job = MergeJob.of(cfg(zoo))
    with job.open():
        merge = TensorMerge(job, progress=False)
        merge.spec = dataclasses.replace(merge.spec, fn=lambda deltas, weights, params, ctx: deltas[0])
        out = dict(merge.tensors())  # every tensor kept while the following ones are read
        names = list(job.plan.merge_names)
    h = tensors(zoo["hate"])
    assert len(names) > 4
    for name in names:  # theta_0 + tau_hate = the hate expert, tensor by tensor
        assert torch.allclose(out[name], h[name], atol=1e-6), name


def test_buffers_are_reused_and_report_ownership() -> None:
    from guardmerge.merge.engine import _Buffers

    bufs = _Buffers(reuse=True)
    a = bufs.take("x", (4, 8), torch.float32)
    b = bufs.take("x", (2, 3), torch.float32)  # smaller: the same memory
    assert a.data_ptr() == b.data_ptr() and bufs.owns(b) and not bufs.owns(torch.zeros(3))
    c = bufs.take("x", (100, 100), torch.bfloat16)  # larger: grown
    assert c.shape == (100, 100) and c.dtype == torch.bfloat16 and bufs.owns(c)
    fresh = _Buffers(reuse=False)
    assert not fresh.owns(fresh.take("x", (2,), torch.float32))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_expert_with_nonfinite_weights_refused(tmp_path: Path, zoo: dict[str, Path], value: float) -> None:
    from guardmerge.merge.stages import merge_to_folder

    bad = copy_expert(zoo["hate"], tmp_path / "bad")
    edit_weights(bad, lambda s: s["bert.encoder.layer.1.output.dense.weight"].view(-1).__setitem__(3, value))
    cfg = load_config(
        merge_cfg(
            tmp_path,
            zoo,
            experts=[{"model": str(bad), "task": "hate"}, {"model": str(zoo["sentiment"]), "task": "sentiment"}],
        )
    )
    with pytest.raises(CheckpointError, match=r"expert 'hate'.*encoder.layer.1.output.dense.weight.*NaN or Inf"):
        merge_to_folder(MergeJob.of(cfg), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_merged_head_keeps_its_experts_tuned_thresholds(tmp_path: Path) -> None:
    """``guardmerge finetune`` stores per-label thresholds in the expert's config.json; the merged
    head answers at them unless the merge config names its own."""
    import json

    from guardmerge.models.expert_meta import EXPERT_KEY
    from tests.builders import make_classifier

    base = make_base(tmp_path / "base")
    tox = make_classifier(tmp_path / "tox", base, ["insult", "threat"], seed=3, kind="multi_label")
    hate = make_classifier(tmp_path / "hate", base, ["hate", "none"], seed=4)
    cfg_file = tox / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[EXPERT_KEY] = {"thresholds": {"insult": 0.31, "threat": 0.7}}
    cfg_file.write_text(json.dumps(cfg))

    def merged(**tox_over: object) -> dict[str, object]:
        experts = [{"model": str(tox), "task": "tox", **tox_over}, {"model": str(hate), "task": "hate"}]
        job = MergeJob.of(parse_config({"base_model": str(base), "experts": experts}))
        heads = merge(job, progress=False).heads
        return {t: dict(spec.thresholds or {}) for t, spec in heads.items()}

    assert merged() == {"tox": {"insult": 0.31, "threat": 0.7}, "hate": {}}
    assert merged(thresholds={"insult": 0.5})["tox"] == {"insult": 0.5}  # the merge config wins


@pytest.mark.parametrize("kernels", ["torch", "fused"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
@pytest.mark.parametrize("path", ["in_memory", "streamed"])
def test_non_finite_is_refused_on_every_merge_path(
    tmp_path: Path, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, kernels: str, method: str, path: str
) -> None:
    """A NaN in an expert, and a merged tensor that overflows, are refused on the chunked torch
    path and the fused kernels, merged in memory or streamed to a folder; nothing is written."""
    from guardmerge.methods.fast import kernels as fast_kernels

    monkeypatch.setenv("GUARDMERGE_KERNELS", kernels)
    if kernels == "fused" and not fast_kernels.enabled():
        pytest.skip("numba is not installed (the fast extra)")

    def run(config: MergeConfig) -> None:
        if path == "in_memory":
            merge(MergeJob.of(config), progress=False)
        else:
            merge_to_folder(MergeJob.of(config), tmp_path / "out", progress=False, max_shard_bytes=4000)

    bad = copy_expert(zoo["hate"], tmp_path / "bad")
    edit_weights(
        bad, lambda s: s["bert.encoder.layer.0.attention.self.query.weight"].view(-1).__setitem__(5, float("nan"))
    )
    experts = [{"model": str(bad), "task": "hate"}, {"model": str(zoo["sentiment"]), "task": "sentiment"}]
    with pytest.raises(CheckpointError, match=r"expert 'hate'.*layer.0.attention.self.query.weight.*NaN or Inf"):
        run(load_config(merge_cfg(tmp_path, zoo, experts=experts, method=method)))
    params = {"scaling": 1.0e8} if method == "task_arithmetic" else {"scaling": 1.0e8, "density": 0.5}
    overflow = load_config(
        merge_cfg(tmp_path, zoo, method=method, parameters=params, out_dtype="float16")
    )  # finite inputs and task vectors, but the merged tensors overflow float16
    with pytest.raises(GuardmergeError, match=r"merged tensor '.*' holds NaN or Inf"):
        run(overflow)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
