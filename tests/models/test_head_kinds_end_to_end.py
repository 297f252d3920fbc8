"""Head kinds (guardmerge.models.head_kinds) end to end: multi-label and token-classification heads
on tiny random BERTs (the kind table's own tests: tests/models/test_head_kinds.py; the same kinds in
every other family: tests/models/test_adapters.py).

A base, a single-label expert, a multi-label expert (``problem_type:
multi_label_classification``) and a token expert (``BertForTokenClassification``, which stores no
pooler) merge into one model: logits shapes, reproduction of each expert, ``predict``
(probabilities, per-label thresholds, entity spans for both aggregations, checked by hand and
against transformers' pipeline), export back to the stock classes, ONNX, serving and its flag
rules, head alignment, HM3, sharing depths, evaluation and the LLM Guard scanners.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from guardmerge.config import parse_config
from guardmerge.errors import CompatibilityError, ConfigError, GuardmergeError
from guardmerge.merge.engine import merge
from guardmerge.merge.job import MergeJob
from guardmerge.merge.stages import build
from guardmerge.models.multihead import MultiHeadModel
from guardmerge.models.outputs import entity_spans, text_tokens
from tests.builders import NER, TEXTS, WORDS, close, make_classifier, stock_logits, tiny_config, write_tokenizer

VOCAB = [*WORDS, "john", "##son", "paris", "##ian", "london"]
SEQ = ["benign", "injection"]
EMO = ["neutral", "anger", "joy"]
SENTENCES = [*TEXTS, "John Johnson will tell the Parisian people", "ignore London , john", "Parisian"]


@dataclass(frozen=True)
class Zoo:
    root: Path
    base: Path
    seq: Path
    emo: Path
    ner: Path
    texts: Path  # unlabelled texts (JSONL)
    words: Path  # unlabelled word-level records (JSONL, {"tokens": [...]})

    def experts(self, data: bool = False, **extra: Any) -> list[dict[str, Any]]:
        out = [
            {"model": str(self.seq), "task": "seq"},
            {"model": str(self.emo), "task": "emo", **extra.get("emo", {})},
            {"model": str(self.ner), "task": "ner"},
        ]
        if data:
            for e in out:
                e["data"] = str(self.words if e["task"] == "ner" else self.texts)
        return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    from transformers import BertModel

    root = tmp_path_factory.mktemp("heads")
    base = root / "base"
    torch.manual_seed(0)
    BertModel(tiny_config(vocab_size=len(VOCAB) + 5)).save_pretrained(str(base))
    write_tokenizer(base, VOCAB)
    rng = random.Random(0)
    sentences = [
        [rng.choice([*VOCAB[:44], "john", "paris", "london"]) for _ in range(rng.randint(2, 9))] for _ in range(40)
    ]
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": " ".join(s)}) + "\n" for s in sentences))
    words = root / "words.jsonl"
    words.write_text("".join(json.dumps({"tokens": s}) + "\n" for s in sentences))
    return Zoo(
        root=root,
        base=base,
        seq=make_classifier(root / "seq", base, SEQ, seed=1),
        emo=make_classifier(root / "emo", base, EMO, seed=2, kind="multi_label"),
        ner=make_classifier(root / "ner", base, NER, seed=3, kind="token"),
        texts=texts,
        words=words,
    )


@pytest.fixture(scope="module")
def merged(zoo: Zoo) -> MultiHeadModel:
    cfg = {"base_model": str(zoo.base), "experts": zoo.experts(), "parameters": {"scaling": 0.5}}
    return merge(MergeJob.of(parse_config(cfg)), progress=False).to_model()


# -- merge, logits, predict ----------------------------------------------------------------------
def test_three_kinds_merge_into_one_model(zoo: Zoo, merged: MultiHeadModel) -> None:
    assert [merged.problem(t) for t in ("seq", "emo", "ner")] == ["single_label", "multi_label", "token"]
    assert merged.spec("ner").input == "tokens" and merged.spec("ner").layers == ("classifier",)
    logits = merged.logits(SENTENCES, batch_size=3)  # token rows padded across batches
    n = len(SENTENCES)
    longest = max(len(t) for t in merged.text_tokens(SENTENCES))
    assert logits["seq"].shape == (n, 2) and logits["emo"].shape == (n, 3)
    assert logits["ner"].shape == (n, longest, 5)
    one_batch = merged.logits(SENTENCES)
    for task in ("seq", "emo"):
        close(logits[task], one_batch[task])
    for i, tok in enumerate(merged.text_tokens(SENTENCES)):  # each text's own rows agree
        close(logits["ner"][i, : len(tok)], one_batch["ner"][i, : len(tok)])


def test_token_expert_without_pooler_merges_with_a_zero_task_vector(zoo: Zoo) -> None:
    from safetensors.torch import load_file

    cfg = {"base_model": str(zoo.base), "experts": zoo.experts(), "parameters": {"scaling": 0.5}}
    res = merge(MergeJob.of(parse_config(cfg)), progress=False)
    base = load_file(str(zoo.base / "model.safetensors"))
    seq = load_file(str(zoo.seq / "model.safetensors"))
    emo = load_file(str(zoo.emo / "model.safetensors"))
    assert "bert.pooler.dense.weight" not in load_file(str(zoo.ner / "model.safetensors"))
    for kind in ("weight", "bias"):
        theta0 = base[f"pooler.dense.{kind}"]
        want = theta0 + 0.5 * (seq[f"bert.pooler.dense.{kind}"] - theta0 + emo[f"bert.pooler.dense.{kind}"] - theta0)
        close(res.tensors[f"pooler.dense.{kind}"], want)


@pytest.mark.parametrize("task", ["seq", "emo", "ner"])
def test_one_expert_at_scaling_1_reproduces_it_and_exports_back(zoo: Zoo, task: str) -> None:
    expert = next(e for e in zoo.experts() if e["task"] == task)
    cfg = {"base_model": str(zoo.base), "experts": [expert], "parameters": {"scaling": 1.0}}
    model = merge(MergeJob.of(parse_config(cfg)), progress=False).to_model()
    token = task == "ner"
    want = stock_logits(Path(expert["model"]), SENTENCES, token)
    close(model.logits(SENTENCES)[task], want)
    close(MultiHeadModel.from_classifier(expert["model"], task).logits(SENTENCES)[task], want)
    out = zoo.root / f"export-one-{task}"
    model.export_task(task, out)
    close(stock_logits(out, SENTENCES, token), want)


def test_export_each_task_to_its_stock_class(zoo: Zoo, merged: MultiHeadModel) -> None:
    from safetensors.torch import load_file

    ref = merged.logits(SENTENCES)
    for task, cls in (
        ("seq", "BertForSequenceClassification"),
        ("emo", "BertForSequenceClassification"),
        ("ner", "BertForTokenClassification"),
    ):
        out = merged.export_task(task, zoo.root / f"export-{task}")
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == [cls]
        assert cfg.get("problem_type") == ("multi_label_classification" if task == "emo" else None)
        close(stock_logits(out, SENTENCES, task == "ner"), ref[task])
        again = MultiHeadModel.from_classifier(out, task)  # load_any's path for a stock folder
        assert again.problem(task) == merged.problem(task)
        close(again.logits(SENTENCES)[task], ref[task])
    assert not [k for k in load_file(str(zoo.root / "export-ner" / "model.safetensors")) if "pooler" in k]


def test_multi_label_probabilities_and_per_label_thresholds(zoo: Zoo, merged: MultiHeadModel) -> None:
    probs = torch.sigmoid(merged.logits(SENTENCES)["emo"])
    out = merged.predict(SENTENCES)["emo"]
    for row, p in zip(out, probs):
        assert list(row["probabilities"]) == EMO
        assert np.allclose(list(row["probabilities"].values()), p.tolist(), atol=1e-6)
        assert row["labels"] == [n for n, v in zip(EMO, p.tolist()) if v >= 0.5]
    everything = merged.predict(SENTENCES, thresholds={"emo": 0.0})["emo"]
    assert all(r["labels"] == EMO for r in everything)
    only = merged.predict(SENTENCES, thresholds={"emo": {"neutral": 1.0, "anger": 0.0, "joy": 1.0}})["emo"]
    assert all(r["labels"] == ["anger"] for r in only)
    with pytest.raises(GuardmergeError, match="unknown label"):
        merged.predict(SENTENCES, thresholds={"emo": {"fear": 0.5}})
    with pytest.raises(GuardmergeError, match="multi-label heads"):
        merged.predict(SENTENCES, thresholds={"seq": 0.5})


def test_per_label_thresholds_in_the_config_are_stored_with_the_head(zoo: Zoo) -> None:
    extra = {"emo": {"thresholds": {"anger": 0.0, "joy": 1.0}}}
    cfg = {"base_model": str(zoo.base), "experts": zoo.experts(**extra)}
    model = merge(MergeJob.of(parse_config(cfg)), progress=False).to_model()
    assert dict(model.spec("emo").thresholds) == {"anger": 0.0, "joy": 1.0}
    saved = MultiHeadModel.from_pretrained(model.save_pretrained(zoo.root / "with-thresholds"))
    assert dict(saved.spec("emo").thresholds) == {"anger": 0.0, "joy": 1.0}
    labels = [r["labels"] for r in saved.predict(SENTENCES)["emo"]]
    assert all("anger" in row and "joy" not in row for row in labels)
    bad = {"emo": {"thresholds": {"fear": 0.3}}}
    with pytest.raises(ConfigError, match=r"expert 'emo': thresholds for unknown label\(s\) fear"):
        merge(MergeJob.of(parse_config({"base_model": str(zoo.base), "experts": zoo.experts(**bad)})), progress=False)
    with pytest.raises(ConfigError, match="outside"):
        parse_config({"base_model": str(zoo.base), "experts": zoo.experts(emo={"thresholds": {"anger": 2}})})


# -- entity spans ---------------------------------------------------------------------------------
def _one_hot(tags: list[str], strength: list[float]) -> np.ndarray:
    rows = np.zeros((len(tags), len(NER)))
    for i, (tag, s) in enumerate(zip(tags, strength)):
        rows[i, NER.index(tag)] = s
    return rows


def test_entity_spans_by_hand_for_both_aggregations(zoo: Zoo) -> None:
    from transformers import AutoTokenizer

    from guardmerge.models.outputs import softmax

    tok = AutoTokenizer.from_pretrained(str(zoo.base))
    text = "John Johnson tell Parisian people"
    tokens = text_tokens(tok, [text], 64)[0]
    # [CLS] john john ##son tell paris ##ian people [SEP]
    assert tokens.offsets == ((0, 0), (0, 4), (5, 9), (9, 12), (13, 17), (18, 23), (23, 26), (27, 33), (0, 0))
    assert tokens.subword == (False, False, False, True, False, False, True, False, False)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "O", "B-LOC", "I-LOC", "O", "O"]
    strength = [5.0, 4.0, 3.0, 2.0, 5.0, 6.0, 1.0, 5.0, 5.0]
    probs = softmax(_one_hot(tags, strength))
    p = {s: float(np.exp(s) / (np.exp(s) + 4)) for s in set(strength)}

    first = entity_spans(text, tokens, probs, NER, "first")
    assert [(e["label"], e["start"], e["end"], e["text"]) for e in first] == [
        ("PER", 0, 12, "John Johnson"),  # johnson takes its first piece's I-PER: one PER span
        ("LOC", 18, 26, "Parisian"),
    ]
    assert first[0]["score"] == pytest.approx((p[4.0] + p[3.0]) / 2)
    assert first[1]["score"] == pytest.approx(p[6.0])

    simple = entity_spans(text, tokens, probs, NER, "simple")
    assert [(e["label"], e["start"], e["end"], e["text"]) for e in simple] == [
        ("PER", 0, 9, "John John"),
        ("LOC", 9, 12, "son"),  # the piece's own B-LOC starts a new entity
        ("LOC", 18, 26, "Parisian"),
    ]
    assert simple[2]["score"] == pytest.approx((p[6.0] + p[1.0]) / 2)
    with pytest.raises(GuardmergeError, match="unknown aggregation"):
        entity_spans(text, tokens, probs, NER, "max")


@pytest.mark.parametrize("strategy", ["first", "simple"])
def test_entity_spans_match_the_transformers_pipeline(zoo: Zoo, strategy: str) -> None:
    import warnings

    from transformers import AutoModelForTokenClassification, AutoTokenizer, TokenClassificationPipeline

    model = MultiHeadModel.from_classifier(zoo.ner, "ner")
    pipe = TokenClassificationPipeline(
        model=AutoModelForTokenClassification.from_pretrained(str(zoo.ner)).eval(),
        tokenizer=AutoTokenizer.from_pretrained(str(zoo.ner)),
        aggregation_strategy=strategy,
    )
    ours = model.predict(SENTENCES, aggregation=strategy)["ner"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = [pipe(text) for text in SENTENCES]
    assert sum(len(x) for x in ours) > 5  # the random expert tags plenty
    for text, mine, ref in zip(SENTENCES, ours, theirs):
        assert [(e["label"], e["start"], e["end"]) for e in mine] == [
            (e["entity_group"], e["start"], e["end"]) for e in ref
        ]
        assert [e["score"] for e in mine] == pytest.approx([float(e["score"]) for e in ref], abs=1e-5)
        assert all(e["text"] == text[e["start"] : e["end"]] for e in mine)


def test_a_slow_tokenizer_is_refused_for_token_heads(merged: MultiHeadModel) -> None:
    class Slow:
        is_fast = False

    with pytest.raises(GuardmergeError, match="need a fast tokenizer"):
        text_tokens(Slow(), ["a"], 8)


# -- ONNX and serving -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_dir(zoo: Zoo, merged: MultiHeadModel) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from guardmerge.export.onnx import export_onnx

    return export_onnx(merged, zoo.root / "onnx")


def test_onnx_outputs_raw_logits_and_records_each_activation(merged: MultiHeadModel, onnx_dir: Path) -> None:
    import onnxruntime as ort

    from guardmerge.export.metadata import read_metadata
    from guardmerge.serve import load_backend

    meta = read_metadata(onnx_dir)
    assert {t: (h["problem"], h["activation"]) for t, h in meta["heads"].items()} == {
        "seq": ("single_label", "softmax"),
        "emo": ("multi_label", "sigmoid"),
        "ner": ("token", "token_softmax"),
    }
    session = ort.InferenceSession(str(onnx_dir / meta["model_file"]), providers=["CPUExecutionProvider"])
    for texts in (SENTENCES, ["sure"]):
        enc = merged.encode(texts)
        outs = session.run(None, {k: enc[k].numpy() for k in meta["inputs"]})
        ref = merged.logits(texts)
        for out, task in zip(outs, meta["tasks"]):
            close(torch.from_numpy(out), ref[task], atol=1e-4)
    backend = load_backend(onnx_dir, "onnx")
    assert [backend.problem(t) for t in ("seq", "emo", "ner")] == ["single_label", "multi_label", "token"]
    close(torch.from_numpy(backend.logits(SENTENCES)["ner"]), merged.logits(SENTENCES)["ner"], atol=1e-4)


def _classify(app: Any, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    import httpx

    from tests.serve.conftest import running

    with running(app) as url:
        res = httpx.post(f"{url}/v1/classify", json=body, timeout=30)
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
    assert res.status_code == 200, res.text
    return res.json(), info


def test_serving_answers_each_kind_and_flags_by_its_rule(merged: MultiHeadModel, onnx_dir: Path) -> None:
    for extra in ("fastapi", "uvicorn", "httpx", "prometheus_client"):
        pytest.importorskip(extra)
    from guardmerge.serve import ServeSettings, create_app, load_backend

    expected = merged.predict(SENTENCES)
    for backend in (merged, load_backend(onnx_dir, "onnx")):
        body, info = _classify(create_app(backend, ServeSettings()), {"texts": SENTENCES})
        for i, row in enumerate(body["results"]):
            seq, emo, ner = row["heads"]["seq"], row["heads"]["emo"], row["heads"]["ner"]
            assert set(seq) == {"label", "score", "probabilities", "flagged"}  # unchanged schema
            assert seq["label"] == expected["seq"][i]["label"]
            assert set(emo) == {"probabilities", "labels", "flagged"}
            assert emo["labels"] == expected["emo"][i]["labels"]
            assert emo["probabilities"] == pytest.approx(expected["emo"][i]["probabilities"], abs=1e-5)
            assert emo["flagged"] == any(n != "neutral" for n in emo["labels"])  # neutral: benign by default
            assert set(ner) == {"entities", "flagged"}
            spans = expected["ner"][i]
            assert [(e["label"], e["start"], e["end"], e["text"]) for e in ner["entities"]] == [
                (e["label"], e["start"], e["end"], e["text"]) for e in spans
            ]
            assert ner["flagged"] == bool(spans)  # any entity flags by default
        heads = {h["task"]: h for h in info["heads"]}
        assert heads["seq"] == {"task": "seq", "labels": SEQ, "threshold": 0.5, "benign": ["benign"]}
        assert heads["emo"]["problem"] == "multi_label" and heads["emo"]["benign"] == ["neutral"]
        assert heads["ner"]["problem"] == "token" and heads["ner"]["entity_types"] == ["PER", "LOC"]


def test_serving_flag_options(merged: MultiHeadModel) -> None:
    for extra in ("fastapi", "uvicorn", "httpx", "prometheus_client"):
        pytest.importorskip(extra)
    from guardmerge.serve import ServeSettings, create_app

    spans = merged.predict(SENTENCES)["ner"]
    settings = ServeSettings(
        thresholds={"emo": 1.0, "emo.anger": 0.0, "seq": None},
        benign={"emo": ["neutral", "joy"]},
        flag_entities={"ner": ["LOC"]},
        aggregation="simple",
    )
    body, info = _classify(create_app(merged, settings), {"texts": SENTENCES})
    for i, row in enumerate(body["results"]):
        assert row["heads"]["emo"]["flagged"]  # anger's threshold 0: every text
        assert row["heads"]["emo"]["labels"] == ["anger"]  # the others need probability 1
        assert not row["heads"]["seq"]["flagged"]  # off
        locs = [e for e in merged.predict([SENTENCES[i]], aggregation="simple")["ner"][0] if e["label"] == "LOC"]
        assert row["heads"]["ner"]["flagged"] == bool(locs)
    assert any(spans)
    heads = {h["task"]: h for h in info["heads"]}
    assert heads["emo"]["label_thresholds"] == {"neutral": 1.0, "anger": 0.0, "joy": 1.0}
    assert heads["ner"]["flag_entities"] == ["LOC"] and heads["ner"]["aggregation"] == "simple"
    # benign labels alone never flag
    body, _ = _classify(
        create_app(merged, ServeSettings(thresholds={"emo": 0.0}, benign={"emo": EMO})), {"texts": SENTENCES[:2]}
    )
    assert not any(r["heads"]["emo"]["flagged"] for r in body["results"])
    for bad, match in [
        (ServeSettings(thresholds={"emo.fear": 0.5}), "has no label 'fear'"),
        (ServeSettings(thresholds={"ner.PER": 0.5}), "no per-label thresholds"),
        (ServeSettings(benign={"ner": ["O"]}), "applies to single-label and multi-label heads"),
        (ServeSettings(benign={"emo": ["calm"]}), "unknown label"),
        (ServeSettings(flag_entities={"ner": ["ORG"]}), "unknown entity type"),
        (ServeSettings(flag_entities={"emo": ["PER"]}), "applies to token heads"),
        (ServeSettings(aggregation="max"), "unknown aggregation"),
    ]:
        with pytest.raises(GuardmergeError, match=match):
            create_app(merged, bad)


def test_cli_parsers_of_thresholds_and_label_lists() -> None:
    from guardmerge.serve.flags import parse_label_lists, parse_thresholds

    assert parse_thresholds(["emo.anger=0.7", "emo = 0.2", "ner=off"]) == {"emo.anger": 0.7, "emo": 0.2, "ner": None}
    assert parse_label_lists(["ner=PER, LOC", "emo=neutral"]) == {"ner": ["PER", "LOC"], "emo": ["neutral"]}
    with pytest.raises(GuardmergeError, match="task=NAME1,NAME2"):
        parse_label_lists(["PER,LOC"], "--flag-entities")


# -- head alignment, HM3, sharing depths ---------------------------------------------------------------
def test_head_alignment_reduces_each_kinds_gap_to_its_expert(zoo: Zoo) -> None:
    cfg = {"base_model": str(zoo.base), "experts": zoo.experts(data=True), "parameters": {"scaling": 0.3}}
    res = build(MergeJob.of(parse_config(cfg)), progress=False)
    report = res.info["align_heads"]["report"]
    assert set(report) == {"seq", "emo", "ner"}
    for fit in report.values():
        assert fit["logit_rmse_after"] < fit["logit_rmse_before"]
    model = res.to_model()
    out = model.export_task("ner", zoo.root / "aligned-ner")
    close(stock_logits(out, SENTENCES, token=True), model.logits(SENTENCES)["ner"])


@pytest.mark.parametrize("method", ["lot", "regmean"])
def test_data_dependent_methods_merge_a_token_expert(zoo: Zoo, method: str, tmp_path: Path, monkeypatch: Any) -> None:
    """The layer-wise stage fits the merged pooler to the base's for the token expert (which has
    none, and counts as unchanged); RegMean reads its Grams like any expert's."""
    monkeypatch.setenv("GUARDMERGE_CACHE", str(tmp_path / "cache"))
    cfg = {"base_model": str(zoo.base), "experts": zoo.experts(data=True), "method": method, "align_heads": False}
    if method == "lot":
        cfg["parameters"] = {"texts": 20}
    res = build(MergeJob.of(parse_config(cfg)), progress=False)
    logits = res.to_model().logits(SENTENCES)
    assert set(logits) == {"seq", "emo", "ner"} and all(bool(torch.isfinite(v).all()) for v in logits.values())
    if method == "lot":
        assert res.info["layerwise"]["layers"] > 0


def test_fisher_statistics_refuse_a_token_expert(zoo: Zoo, tmp_path: Path, monkeypatch: Any) -> None:
    from guardmerge.errors import StatisticsError

    monkeypatch.setenv("GUARDMERGE_CACHE", str(tmp_path / "cache"))
    cfg = {"base_model": str(zoo.base), "experts": zoo.experts(data=True), "method": "fisher", "align_heads": False}
    with pytest.raises(StatisticsError, match="token classifier: Fisher statistics"):
        build(MergeJob.of(parse_config(cfg)), progress=False)


def test_hm3_sigmoid_per_block_and_token_refusal(zoo: Zoo) -> None:
    experts = zoo.experts()[:2]
    model = merge(
        MergeJob.of(parse_config({"base_model": str(zoo.base), "experts": experts, "heads": "hm3"})), progress=False
    )
    m = model.to_model()
    assert m.problem("emo") == "multi_label" and m.logits(TEXTS)["emo"].shape == (len(TEXTS), 3)
    probs = [list(r["probabilities"].values()) for r in m.predict(TEXTS)["emo"]]
    assert np.allclose(probs, torch.sigmoid(m.logits(TEXTS)["emo"]).numpy(), atol=1e-6)  # not a softmax
    one = merge(
        MergeJob.of(
            parse_config(
                {"base_model": str(zoo.base), "experts": experts[1:], "heads": "hm3", "parameters": {"scaling": 1.0}}
            )
        ),
        progress=False,
    ).to_model()
    close(one.logits(TEXTS)["emo"], stock_logits(zoo.emo, TEXTS))
    with pytest.raises(CompatibilityError, match=r"heads: hm3 .*expert 'ner' .* is a token classifier"):
        merge(
            MergeJob.of(parse_config({"base_model": str(zoo.base), "experts": zoo.experts(), "heads": "hm3"})),
            progress=False,
        )


def test_sharing_depth_0_reproduces_every_kind_of_expert(zoo: Zoo) -> None:
    cfg = {"base_model": str(zoo.base), "experts": zoo.experts(), "share_layers": 0}
    model = merge(MergeJob.of(parse_config(cfg)), progress=False).to_model()
    assert model.share_layers == 0
    assert "pooler.dense.weight" not in model.branch("ner").state()  # the token expert has none
    logits = model.logits(SENTENCES)
    for task, folder in (("seq", zoo.seq), ("emo", zoo.emo), ("ner", zoo.ner)):
        close(logits[task], stock_logits(folder, SENTENCES, task == "ner"))
    out = model.export_task("ner", zoo.root / "branch-ner")
    close(stock_logits(out, SENTENCES, token=True), logits["ner"])
    again = MultiHeadModel.from_pretrained(model.save_pretrained(zoo.root / "branched"))
    close(again.logits(SENTENCES)["ner"], logits["ner"], atol=0)


# -- evaluation and the CLI ------------------------------------------------------------------------------
def _word_level_predictions(folder: Path, words: list[list[str]]) -> list[list[int]]:
    """Each word's first sub-token's tag, from the stock expert with pre-split words (a path
    independent of guardmerge's character offsets)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForTokenClassification.from_pretrained(str(folder)).eval()
    enc = tok(words, is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        tags = model(**enc).logits.argmax(-1)
    out = []
    for i in range(len(words)):
        row: dict[int, int] = {}
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None and w not in row:
                row[w] = int(tags[i, j])
        out.append([row[w] for w in range(len(words[i]))])
    return out


def test_evaluation_of_token_and_multi_label_folders(zoo: Zoo, tmp_path: Path) -> None:
    from guardmerge.data import load_task
    from guardmerge.evaluate import evaluate, multi_label_metrics, token_metrics

    words = [s.split() for s in SENTENCES]
    predicted = _word_level_predictions(zoo.ner, words)
    gold = [row if i % 2 else [0] * len(row) for i, row in enumerate(predicted)]  # half right, half all O
    ner = tmp_path / "ner"
    ner.mkdir()
    (ner / "labels.json").write_text(json.dumps({"labels": NER, "type": "token"}))
    (ner / "test.jsonl").write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in zip(words, gold)))
    emo = tmp_path / "emo"
    emo.mkdir()
    (emo / "labels.json").write_text(json.dumps({"labels": EMO, "type": "multi_label"}))
    sets = [[0], [], [0, 2], [1], [1, 2], [], [0], [2], [0, 1, 2], [1], [2]]
    (emo / "test.jsonl").write_text(
        "".join(json.dumps({"text": t, "labels": s}) + "\n" for t, s in zip(SENTENCES, sets))
    )

    for model, name in (
        (MultiHeadModel.from_classifier(zoo.ner, "ner"), "ner"),
        (MultiHeadModel.from_classifier(zoo.emo, "emo"), "emo"),
    ):
        data = {name: load_task(tmp_path / name).split("test")}
        res = evaluate(model, data, progress=True, batch_size=4)[name]
        if name == "ner":
            assert res == pytest.approx(token_metrics(gold, predicted, NER))
            assert 0 < res["micro_f1"] < 1 and "macro_f1" in res and "f1/PER" in res
        else:
            hits = (torch.sigmoid(stock_logits(zoo.emo, SENTENCES)) >= 0.5).tolist()
            pred = [[k for k, on in enumerate(row) if on] for row in hits]
            assert res == pytest.approx(multi_label_metrics(sets, pred, EMO))
    with pytest.raises(GuardmergeError, match="token examples but head 'emo' is a multi-label head"):
        evaluate(MultiHeadModel.from_classifier(zoo.emo, "emo"), {"emo": load_task(ner).split("test")})


def test_cli_predict_prints_every_kind(zoo: Zoo, merged: MultiHeadModel) -> None:
    from typer.testing import CliRunner

    from guardmerge.cli import app

    folder = merged.save_pretrained(zoo.root / "cli-merged")
    text = "John Johnson tell Parisian people"
    res = CliRunner().invoke(app, ["predict", str(folder), text, "--json", "--threshold", "emo.anger=0"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output.strip().splitlines()[-1])
    assert "anger" in row["emo"]["labels"] and isinstance(row["ner"], list) and "label" in row["seq"]
    plain = CliRunner().invoke(app, ["predict", str(folder), text, "--aggregation", "simple"])
    assert plain.exit_code == 0, plain.output


def test_llm_guard_scanners_skip_token_heads_and_read_sigmoids(merged: MultiHeadModel) -> None:
    from guardmerge.integrations.llm_guard import scanners

    found = scanners(merged)
    assert [s.task for s in found] == ["seq", "emo"]
    result = found[1].result(TEXTS[0])
    probs = torch.sigmoid(merged.logits([TEXTS[0]])["emo"])[0].tolist()
    assert list(result.probabilities.values()) == pytest.approx(probs, abs=1e-6)
    assert result.score == pytest.approx(max(probs[1:]), abs=1e-6)  # neutral is benign
    with pytest.raises(GuardmergeError, match="token-classification heads"):
        scanners(merged, tasks=["ner"])
