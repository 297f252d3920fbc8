"""Token-classification and multi-label heads in every other multi-head family (tiny random models built
from their configs): a token expert at scaling 1 reproduces itself, merges beside a multi-label
expert, exports back to the family's stock token classifier with the same logits, and its ONNX
graph matches PyTorch. ModernBERT's token head is its prediction head (``head.dense``, activation,
``head.norm``) then ``classifier``; the others a single ``classifier`` on the token states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from guardmerge.config import parse_config
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from tests.builders import TEXTS, make_classifier
from tests.test_families import FAMILIES, LONG, make_family_base
from tests.test_heads import NER, close, stock_logits

TOKEN_LAYERS = {"modernbert": ("head.dense", "classifier"), "modernbert-mean": ("head.dense", "classifier")}
SAMPLES = [*TEXTS, LONG]


def _base(folder: Path, family: str) -> Path:
    """A headless base of ``family``: test_families' families, plus RoBERTa and DistilBERT."""
    import transformers as tf

    from tests.builders import WORDS, write_tokenizer

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
