"""The architecture adapters (guardmerge.models.adapters): every model family end to end, on tiny
random models built from their configs (no download).

For each family: a headless base and two experts (2 and 3 labels) perturbed from it, saved as
stock ``*ForSequenceClassification`` folders; then a one-expert merge at scaling 1, a two-expert
merge (predict, save/load, export back to the stock class, ONNX, serving), head alignment, HM3
where the head is a single Linear, sharing depths and the layer-wise stage where the adapter
supports them (a clear refusal where it does not), and mismatched experts refused by name.

Token-classification and multi-label heads in every multi-head family (these families, RoBERTa and
DistilBERT): a token expert at scaling 1 reproduces itself, merges beside a multi-label expert,
exports back to the family's stock token classifier with the same logits, and its ONNX graph
matches PyTorch. ModernBERT's token head is its prediction head (``head.dense``, activation,
``head.norm``) then ``classifier``; the others a single ``classifier`` on the token states.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from guardmerge.config import parse_config
from guardmerge.errors import CompatibilityError, ConfigError, StatisticsError
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.merge.stages import build
from guardmerge.models.adapters import ArchitectureAdapter, get_adapter
from guardmerge.models.multihead import MultiHeadModel
from tests.builders import NER, TEXTS, WORDS, close, expert_logits, make_classifier, stock_logits, write_tokenizer

FAMILIES = ["deberta-v2", "xlm-roberta", "modernbert", "modernbert-mean", "electra", "mpnet", "albert"]
LONG = " ".join(TEXTS)  # longer than the texts the ONNX graph is traced with
NO_TOKEN_TYPES = ("input_ids", "attention_mask")  # tokenizers of families without token types


def family_config(family: str, **overrides: Any) -> Any:
    """A tiny transformers config of ``family`` (2 layers, hidden size 16, no dropout)."""
    import transformers as tf

    sizes: dict[str, Any] = {
        "vocab_size": len(WORDS) + 5,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    drop = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if family == "deberta-v2":  # DeBERTa-v3 settings: relative attention, no absolute positions
        cfg = {
            **sizes,
            **drop,
            "max_position_embeddings": 64,
            "relative_attention": True,
            "position_buckets": 8,
            "pos_att_type": ["p2c", "c2p"],
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "position_biased_input": False,
            "type_vocab_size": 0,
            "pooler_dropout": 0.0,
            "pooler_hidden_size": 16,
            "pooler_hidden_act": "gelu",
            "pad_token_id": 0,
        }
        return tf.DebertaV2Config(**{**cfg, **overrides})
    if family == "xlm-roberta":
        return tf.XLMRobertaConfig(**{**sizes, **drop, "max_position_embeddings": 70, "pad_token_id": 0, **overrides})
    if family.startswith("modernbert"):
        cfg = {
            **sizes,
            "max_position_embeddings": 64,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "cls_token_id": 2,
            "sep_token_id": 3,
            "global_attn_every_n_layers": 2,  # layer 1 attends through a sliding window
            "local_attention": 4,
            "classifier_pooling": "mean" if family.endswith("mean") else "cls",
            "attention_dropout": 0.0,
            "mlp_dropout": 0.0,
            "embedding_dropout": 0.0,
            "classifier_dropout": 0.0,
        }
        return tf.ModernBertConfig(**{**cfg, **overrides})
    if family == "electra":  # embedding size below the hidden size: embeddings_project
        return tf.ElectraConfig(**{**sizes, **drop, "embedding_size": 8, "max_position_embeddings": 64, **overrides})
    if family == "mpnet":
        return tf.MPNetConfig(**{**sizes, **drop, "max_position_embeddings": 70, "pad_token_id": 1, **overrides})
    if family == "albert":
        cfg = {**sizes, **drop, "embedding_size": 8, "max_position_embeddings": 64, "classifier_dropout_prob": 0.0}
        return tf.AlbertConfig(**{**cfg, **overrides})
    raise KeyError(family)


def _tokenizer(folder: Path, family: str) -> None:
    names = NO_TOKEN_TYPES if family.startswith("modernbert") or family == "mpnet" else None
    write_tokenizer(folder, model_input_names=names)


def make_family_expert(
    folder: Path, family: str, base: Path | None, labels: list[str], seed: int, **config: Any
) -> Path:
    """A stock ``*ForSequenceClassification``: the base (random when None) plus a small random
    task vector, with a random head large enough to give distinct logits."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    cfg = family_config(family, **config)
    cfg.num_labels = len(labels)
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {n: i for i, n in enumerate(labels)}
    adapter = get_adapter(cfg.model_type)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg)
    if base is not None:
        body = AutoModel.from_pretrained(str(base))
        _, unexpected = getattr(model, adapter.prefix).load_state_dict(body.state_dict(), strict=False)
        assert not [u for u in unexpected if not u.startswith("pooler.")], unexpected
    with torch.no_grad():
        for name, p in model.named_parameters():
            if adapter.is_head(adapter.canonical(name)):
                p.normal_(0, 0.5)
            else:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    _tokenizer(folder, family)
    return folder


def make_family_base(folder: Path, family: str, seed: int = 0, with_pooler: bool = True) -> Path:
    """A headless base model of ``family`` (``AutoModel``), saved with its tokenizer."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    cfg = family_config(family)
    kwargs = get_adapter(cfg.model_type).encoder_kwargs(with_pooler)
    AutoModel.from_config(cfg, **kwargs).save_pretrained(str(folder))
    _tokenizer(folder, family)
    return folder


@dataclass(frozen=True)
class Zoo:
    family: str
    adapter: ArchitectureAdapter
    base: Path
    e0: Path  # labels a, b
    e1: Path  # labels x, y, z
    data: Path  # unlabelled texts (JSONL)
    root: Path

    def experts(self, data: bool = False) -> list[dict[str, str]]:
        extra = {"data": str(self.data)} if data else {}
        return [{"model": str(self.e0), "task": "t0", **extra}, {"model": str(self.e1), "task": "t1", **extra}]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = make_family_base(root / "base", family)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(40)]
    data = root / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    return Zoo(
        family=family,
        adapter=get_adapter(family_config(family).model_type),
        base=base,
        e0=make_family_expert(root / "e0", family, base, ["a", "b"], seed=1),
        e1=make_family_expert(root / "e1", family, base, ["x", "y", "z"], seed=2),
        data=data,
        root=root,
    )


@pytest.fixture(scope="module")
def merged2(fam: Zoo) -> MultiHeadModel:
    """Task arithmetic (scaling 0.5) of both experts."""
    cfg = {"base_model": str(fam.base), "experts": fam.experts(), "parameters": {"scaling": 0.5}}
    return merge(MergeJob.of(parse_config(cfg)), progress=False).to_model()


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)


def _export_matches(model: MultiHeadModel, task: str, folder: Path, cls: str) -> None:
    """``task`` exported to ``folder`` is a stock ``cls`` with the multi-head model's logits."""
    from transformers import AutoModelForSequenceClassification

    model.export_task(task, folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == [cls]
    assert type(AutoModelForSequenceClassification.from_pretrained(str(folder))).__name__ == cls
    _close(expert_logits(folder, [*TEXTS, LONG]), model.logits([*TEXTS, LONG])[task])


def test_one_expert_at_scaling_1_reproduces_the_expert(fam: Zoo) -> None:
    cfg = {"base_model": str(fam.base), "experts": fam.experts()[1:], "parameters": {"scaling": 1.0}}
    model = merge(MergeJob.of(parse_config(cfg)), progress=False).to_model()
    want = expert_logits(fam.e1, [*TEXTS, LONG])
    _close(model.logits([*TEXTS, LONG])["t1"], want)
    _close(MultiHeadModel.from_classifier(fam.e1, "t1").logits([*TEXTS, LONG])["t1"], want)
    _export_matches(model, "t1", fam.root / "one-export", fam.adapter.classifier_class)  # and back
    _close(expert_logits(fam.root / "one-export", [*TEXTS, LONG]), want)


def test_two_experts_predict_save_and_export_to_the_stock_class(fam: Zoo, merged2: MultiHeadModel) -> None:
    out = merged2.predict(TEXTS)
    assert set(out) == {"t0", "t1"}
    assert {r["label"] for r in out["t0"]} <= {"a", "b"} and {r["label"] for r in out["t1"]} <= {"x", "y", "z"}
    assert all(len(rows) == len(TEXTS) for rows in out.values())
    layout = fam.adapter.head_layout(json.loads((fam.e1 / "config.json").read_text()))
    assert merged2.heads["t1"].spec.layers == layout.layers  # type: ignore[union-attr]
    assert merged2.heads["t1"].spec.input == layout.input  # type: ignore[union-attr]
    saved = merged2.save_pretrained(fam.root / "merged")
    again = MultiHeadModel.from_pretrained(saved)
    for task, logits in merged2.logits(TEXTS).items():
        _close(again.logits(TEXTS)[task], logits, atol=0)
    for task in ("t0", "t1"):
        _export_matches(merged2, task, fam.root / f"export-{task}", fam.adapter.classifier_class)


def test_onnx_export_matches_torch(fam: Zoo, merged2: MultiHeadModel) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from guardmerge.export.metadata import read_metadata
    from guardmerge.export.onnx import export_onnx

    folder = export_onnx(merged2, fam.root / "onnx")
    meta = read_metadata(folder)
    session = ort.InferenceSession(str(folder / meta["model_file"]), providers=["CPUExecutionProvider"])
    for texts in (TEXTS, [LONG, "sure"], ["sure"]):
        enc = merged2.encode(texts)
        outs = session.run(None, {k: enc[k].numpy() for k in meta["inputs"]})
        ref = merged2.logits(texts)
        for out, task in zip(outs, meta["tasks"]):
            _close(torch.from_numpy(out), ref[task], atol=1e-4)


def test_serving_returns_every_head(merged2: MultiHeadModel) -> None:
    for extra in ("fastapi", "uvicorn", "prometheus_client"):
        pytest.importorskip(extra)
    httpx = pytest.importorskip("httpx")
    from guardmerge.serve import ServeSettings, create_app
    from tests.serve.conftest import running

    expected = merged2.predict(TEXTS)
    benign = {t: merged2.labels(t)[:1] for t in merged2.tasks}  # labels a, b...: no name looks benign
    with running(create_app(merged2, ServeSettings(benign=benign))) as url:
        res = httpx.post(f"{url}/v1/classify", json={"texts": TEXTS}, timeout=30)
    assert res.status_code == 200, res.text
    for i, row in enumerate(res.json()["results"]):
        for task in ("t0", "t1"):
            assert row["heads"][task]["label"] == expected[task][i]["label"]
            assert row["heads"][task]["score"] == pytest.approx(expected[task][i]["score"], abs=1e-5)


def test_head_alignment_fits_and_exports(fam: Zoo) -> None:
    cfg = {"base_model": str(fam.base), "experts": fam.experts(data=True), "parameters": {"scaling": 0.5}}
    res = build(MergeJob.of(parse_config(cfg)), progress=False)
    report = res.info["align_heads"]["report"]
    assert set(report) == {"t0", "t1"}
    for fit in report.values():
        assert fit["logit_rmse_after"] <= fit["logit_rmse_before"] + 1e-9
    model = res.to_model()
    folder = fam.root / "aligned-export"
    _export_matches(model, "t1", folder, fam.adapter.classifier_class)
    if fam.family.startswith("modernbert"):  # the fitted bias of head.dense switches classifier_bias on
        assert json.loads((folder / "config.json").read_text())["classifier_bias"] is True
        assert "heads.t1.head.dense.bias" in res.tensors


def test_hm3_where_the_head_is_a_single_linear(fam: Zoo) -> None:
    cfg = parse_config({"base_model": str(fam.base), "experts": fam.experts(), "heads": "hm3"})
    if fam.adapter.hidden_in_head:
        with pytest.raises(CompatibilityError, match="hm3 needs a single Linear head"):
            merge(MergeJob.of(cfg), progress=False)
        return
    model = merge(MergeJob.of(cfg), progress=False).to_model()
    assert set(model.predict(TEXTS)) == {"t0", "t1"}
    _export_matches(model, "t0", fam.root / "hm3-export", fam.adapter.classifier_class)


@pytest.mark.parametrize("depth", [0, 1])
def test_sharing_depth_or_a_clear_refusal(fam: Zoo, depth: int) -> None:
    cfg = {
        "base_model": str(fam.base),
        "experts": fam.experts(data=True),
        "share_layers": depth,
        "branch_align": True,
        "align_heads": False,
    }
    problem = fam.adapter.sharing_problem()
    if problem:
        with pytest.raises(ConfigError, match=f"{fam.adapter.model_type} models do not support share_layers"):
            build(MergeJob.of(parse_config(cfg)), progress=False)
        return
    model = build(MergeJob.of(parse_config(cfg)), progress=False).to_model()
    assert model.share_layers == depth
    _export_matches(model, "t1", fam.root / f"branch-export-{depth}", fam.adapter.classifier_class)


def test_layerwise_stage_or_a_clear_refusal(fam: Zoo) -> None:
    cfg = parse_config(
        {"base_model": str(fam.base), "experts": fam.experts(data=True), "method": "lot", "align_heads": False}
    )
    if fam.adapter.layerwise_problem():
        with pytest.raises(ConfigError, match=f"layer-wise stage does not support {fam.adapter.model_type}"):
            build(MergeJob.of(cfg), progress=False)
        return
    res = build(MergeJob.of(cfg), progress=False)
    assert res.info["layerwise"]["layers"] > 0
    assert set(res.to_model().predict(TEXTS)) == {"t0", "t1"}


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_statistics_methods_or_a_clear_refusal(
    fam: Zoo, method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gram and Fisher statistics; per-example Fisher is refused where the family reads a
    prepared additive mask differently, and the batch gradient then works."""
    monkeypatch.setenv("GUARDMERGE_CACHE", str(tmp_path / "cache"))
    cfg: dict[str, Any] = {
        "base_model": str(fam.base),
        "experts": fam.experts(data=True),
        "method": method,
        "align_heads": False,
    }
    if method == "fisher" and not fam.adapter.additive_mask:
        with pytest.raises(StatisticsError, match=r"per-example Fisher .*fisher_gradient: batch"):
            build(MergeJob.of(parse_config(cfg)), progress=False)
        cfg["statistics"] = {"fisher_gradient": "batch"}
    logits = build(MergeJob.of(parse_config(cfg)), progress=False).to_model().logits(TEXTS)
    assert set(logits) == {"t0", "t1"} and all(bool(torch.isfinite(v).all()) for v in logits.values())


def test_mismatched_family_or_size_is_refused_naming_the_expert(fam: Zoo, zoo: dict[str, Path]) -> None:
    other = {"model": str(zoo["hate"]), "task": "odd"}  # a tiny BERT classifier
    with pytest.raises(CompatibilityError, match=r"expert 'odd' .* is a 'bert' model but the base"):
        merge(
            MergeJob.of(parse_config({"base_model": str(fam.base), "experts": [*fam.experts(), other]})), progress=False
        )
    deeper = fam.root / "deeper"
    if not deeper.exists():
        make_family_expert(deeper, fam.family, None, ["p", "q"], seed=5, num_hidden_layers=3)
    bad = {"model": str(deeper), "task": "deep"}
    with pytest.raises(CompatibilityError, match=r"expert 'deep' .*config field 'num_hidden_layers' is 3"):
        merge(
            MergeJob.of(parse_config({"base_model": str(fam.base), "experts": [*fam.experts(), bad]})), progress=False
        )


def test_a_base_without_pooler_gives_each_head_its_experts_pooler(tmp_path: Path) -> None:
    """ALBERT from a masked-LM style base (no pooler): the heads own pooler + classifier."""
    with_pooler = make_family_base(tmp_path / "pooled", "albert")
    e0 = make_family_expert(tmp_path / "e0", "albert", with_pooler, ["a", "b"], seed=1)
    bare = make_family_base(tmp_path / "bare", "albert", with_pooler=False)
    model = merge(
        MergeJob.of(
            parse_config(
                {"base_model": str(bare), "experts": [{"model": str(e0), "task": "t0"}], "parameters": {"scaling": 1}}
            )
        ),
        progress=False,
    ).to_model()
    assert model.heads["t0"].spec.layers == ("pooler", "classifier")  # type: ignore[union-attr]
    _close(model.logits(TEXTS)["t0"], expert_logits(e0))
    _export_matches(model, "t0", tmp_path / "export", "AlbertForSequenceClassification")


# -- token and multi-label heads in every family --------------------------------------------------

TOKEN_LAYERS = {"modernbert": ("head.dense", "classifier"), "modernbert-mean": ("head.dense", "classifier")}
SAMPLES = [*TEXTS, LONG]


def _base(folder: Path, family: str) -> Path:
    """A headless base of ``family``: the families above, plus RoBERTa and DistilBERT."""
    import transformers as tf

    if family not in ("roberta", "distilbert"):
        return make_family_base(folder, family)
    torch.manual_seed(0)
    vocab = len(WORDS) + 5
    if family == "roberta":
        drop = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        sizes = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
        cfg: object = tf.RobertaConfig(vocab_size=vocab, max_position_embeddings=70, pad_token_id=0, **sizes, **drop)
        names = None
    else:
        cfg = tf.DistilBertConfig(
            vocab_size=vocab, dim=16, n_layers=2, n_heads=2, hidden_dim=32, dropout=0.0, attention_dropout=0.0
        )
        names = ("input_ids", "attention_mask")
    tf.AutoModel.from_config(cfg).save_pretrained(str(folder))
    write_tokenizer(folder, model_input_names=names)
    return folder


@pytest.fixture(scope="module", params=[*FAMILIES, "roberta", "distilbert"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(f"heads-{request.param}")
    base = _base(root / "base", request.param)
    make_classifier(root / "ner", base, NER, seed=3, kind="token")
    make_classifier(root / "emo", base, ["neutral", "anger", "joy"], seed=2, kind="multi_label")
    return request.param, root


def test_token_and_multi_label_heads_in_every_family(family: tuple[str, Path]) -> None:
    name, root = family
    from guardmerge.models.adapters import get_adapter

    adapter = get_adapter(json.loads((root / "base" / "config.json").read_text())["model_type"])
    base, ner, emo = root / "base", root / "ner", root / "emo"
    want = stock_logits(ner, SAMPLES, token=True)
    one = {"base_model": str(base), "experts": [{"model": str(ner), "task": "ner"}], "parameters": {"scaling": 1.0}}
    model = merge(MergeJob.of(parse_config(one)), progress=False).to_model()
    assert model.spec("ner").layers == TOKEN_LAYERS.get(name, ("classifier",))
    close(model.logits(SAMPLES)["ner"], want)

    both = {
        "base_model": str(base),
        "experts": [{"model": str(emo), "task": "emo"}, {"model": str(ner), "task": "ner"}],
        "parameters": {"scaling": 0.5},
    }
    merged = merge(MergeJob.of(parse_config(both)), progress=False).to_model()
    ref = merged.logits(SAMPLES)
    assert ref["emo"].shape == (len(SAMPLES), 3) and ref["ner"].shape[-1] == len(NER)
    out = merged.predict(SAMPLES)
    assert all(isinstance(spans, list) for spans in out["ner"]) and all("labels" in r for r in out["emo"])
    for task, cls, token in (
        ("ner", adapter.token_classifier_class, True),
        ("emo", adapter.classifier_class, False),
    ):
        folder = merged.export_task(task, root / f"export-{task}")
        assert json.loads((folder / "config.json").read_text())["architectures"] == [cls]
        close(stock_logits(folder, SAMPLES, token), ref[task])


def test_token_head_onnx_matches_torch(family: tuple[str, Path]) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from guardmerge.export.metadata import read_metadata
    from guardmerge.export.onnx import export_onnx
    from guardmerge.models.multihead import MultiHeadModel

    _, root = family
    model = MultiHeadModel.from_classifier(root / "ner", "ner")
    folder = export_onnx(model, root / "onnx")
    meta = read_metadata(folder)
    assert meta["heads"]["ner"]["activation"] == "token_softmax"
    session = ort.InferenceSession(str(folder / meta["model_file"]), providers=["CPUExecutionProvider"])
    for texts in (SAMPLES, ["sure"]):
        enc = model.encode(texts)
        (out,) = session.run(None, {k: enc[k].numpy() for k in meta["inputs"]})
        real = enc["attention_mask"].bool()  # ModernBERT's padding rows differ; no text reads them
        close(torch.from_numpy(out)[real], model.logits(texts)["ner"][real], atol=1e-4)
