"""Fidelity of merged heads to their experts (guardmerge.evaluate.fidelity): the per-kind
comparisons on hand-made logits, the report on tiny random models of every head kind, and
``guardmerge eval MERGED --experts`` end to end on unlabelled texts."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from guardmerge.cli import app
from guardmerge.errors import ConfigError, DataError, GuardmergeError
from guardmerge.evaluate import token_metrics
from guardmerge.evaluate.fidelity import (
    COMPARISONS,
    Compared,
    argmax_agreement,
    compare_logits,
    expert_folders,
    fidelity,
    fidelity_table,
    fidelity_texts,
    head_logits,
    label_set_agreement,
    span_agreement,
)
from guardmerge.models.head_kinds import HEAD_KINDS
from guardmerge.models.multihead import MultiHeadModel, load_any
from guardmerge.models.outputs import TextTokens
from tests.builders import (
    NER,
    WORDS,
    copy_expert,
    edit_weights,
    make_classifier,
    random_texts,
    texts_jsonl,
    tiny_config,
    write_tokenizer,
)

runner = CliRunner()
TAGS = NER  # O, B-PER, I-PER, B-LOC, I-LOC


def onehot(classes: list[int], width: int, scale: float = 5.0) -> np.ndarray:
    """Logits ``[len(classes), width]`` whose argmax is each of ``classes``."""
    out = np.zeros((len(classes), width))
    out[np.arange(len(classes)), classes] = scale
    return out


def test_every_head_kind_names_a_comparison() -> None:
    assert {kind.fidelity for kind in HEAD_KINDS.values()} <= set(COMPARISONS)
    assert len({kind.fidelity for kind in HEAD_KINDS.values()}) == len(HEAD_KINDS)


def test_argmax_agreement_counts_the_texts_with_the_experts_label() -> None:
    expert = [0, 1, 2, 1, 0, 0, 2, 1, 1, 0]
    merged = [0, 1, 2, 1, 1, 0, 0, 1, 2, 0]  # texts 4, 6 and 8 disagree
    res = argmax_agreement(Compared(["a", "b", "c"], onehot(merged, 3), onehot(expert, 3)))
    assert res["agreement"].value() == pytest.approx(0.7)
    assert res["agreement"].num.tolist() == [1, 1, 1, 1, 0, 1, 0, 1, 0, 1]


def sig_logits(probs: list[list[float]]) -> np.ndarray:
    p = np.asarray(probs)
    return np.log(p / (1 - p))


def test_label_set_agreement_is_the_whole_set_and_per_label() -> None:
    expert = sig_logits([[0.9, 0.1, 0.1], [0.9, 0.9, 0.1], [0.1, 0.6, 0.1], [0.2, 0.2, 0.8]])
    merged = sig_logits([[0.8, 0.2, 0.3], [0.9, 0.2, 0.1], [0.7, 0.3, 0.1], [0.3, 0.1, 0.9]])
    # sets at 0.5: expert {a} {a,b} {b} {c}; merged {a} {a} {a} {c}: texts 0 and 3 agree
    res = label_set_agreement(Compared(["a", "b", "c"], merged, expert, [0.5, 0.5, 0.5]))
    assert res["agreement"].value() == pytest.approx(0.5)
    assert res["label_agreement"].value() == pytest.approx(9 / 12)  # 3 + 2 + 1 + 3 of 12 decisions
    assert res["agreement/a"].value() == pytest.approx(0.75)
    assert res["agreement/b"].value() == pytest.approx(0.5)
    assert res["agreement/c"].value() == 1.0
    # the head's thresholds decide: at 0.65 for b, text 2's b (0.6) is off for the expert too
    res = label_set_agreement(Compared(["a", "b", "c"], merged, expert, [0.5, 0.65, 0.5]))
    assert res["agreement/b"].value() == pytest.approx(0.75)


def word_tokens(text: str) -> TextTokens:
    """[CLS] one token per space-separated word [SEP]."""
    offsets, start = [(0, 0)], 0
    for word in text.split(" "):
        offsets.append((start, start + len(word)))
        start += len(word) + 1
    offsets.append((0, 0))
    special = (True, *([False] * (len(offsets) - 2)), True)
    return TextTokens(tuple(offsets), special, tuple([False] * len(offsets)))


def test_span_agreement_is_entity_f1_as_seqeval_counts_it_and_token_agreement() -> None:
    texts = ["anna lives in paris", "bob and carl", "nothing here"]
    gold_words = [[1, 0, 0, 3], [1, 0, 1], [0, 0]]  # the expert's tags per word
    pred_words = [[1, 0, 0, 0], [1, 2, 1], [0, 0]]  # paris missed; "bob and" one wrong span
    tokens = [word_tokens(t) for t in texts]
    width = max(len(t) for t in tokens)

    def logits(words: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(words), width, len(TAGS)))  # padding and [CLS]/[SEP] rows: all zero
        for i, tags in enumerate(words):
            out[i, 1 : 1 + len(tags)] = onehot(tags, len(TAGS))
        return out

    c = Compared(TAGS, logits(pred_words), logits(gold_words), texts=texts, tokens=tokens)
    res = span_agreement(c)
    want = token_metrics(gold_words, pred_words, TAGS)["micro_f1"]  # seqeval, strict IOB2
    assert res["agreement"].value() == pytest.approx(want)
    # expert spans: anna, paris, bob, carl (4); merged: anna, "bob and", carl (3); 2 match
    assert res["agreement"].value() == pytest.approx(2 * 2 / (4 + 3))
    assert res["token_agreement"].value() == pytest.approx(7 / 9)  # 9 words, "paris" and "and" differ
    # no entity on either side is full agreement
    assert span_agreement(c.take(np.array([2])))["agreement"].value() == 1.0


# -- tiny random models of every head kind -------------------------------------------------------

VOCAB = [*WORDS, "john", "paris", "london"]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and three experts: ``seq`` (single-label), ``emo`` (multi-label), ``ner`` (token)."""
    from transformers import BertModel

    root = tmp_path_factory.mktemp("fidelity")
    base = root / "base"
    torch.manual_seed(0)
    BertModel(tiny_config(vocab_size=len(VOCAB) + 5)).save_pretrained(str(base))
    write_tokenizer(base, VOCAB)
    return {
        "base": base,
        "seq": make_classifier(root / "seq", base, ["benign", "injection"], seed=1),
        "emo": make_classifier(root / "emo", base, ["neutral", "anger", "joy"], seed=2, kind="multi_label"),
        "ner": make_classifier(root / "ner", base, TAGS, seed=3, kind="token"),
    }


@pytest.fixture(scope="module")
def kinds_merged(kinds: dict[str, Path]) -> MultiHeadModel:
    from guardmerge.config import parse_config
    from guardmerge.merge.engine import merge
    from guardmerge.merge.job import MergeJob

    experts = [{"model": str(kinds[t]), "task": t} for t in ("seq", "emo", "ner")]
    cfg = {"base_model": str(kinds["base"]), "experts": experts, "parameters": {"scaling": 0.5}}
    return merge(MergeJob.of(parse_config(cfg)), progress=False).to_model()


def vocab_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def test_a_model_agrees_with_itself_on_every_head_kind(kinds_merged: MultiHeadModel) -> None:
    texts = {"seq": vocab_texts(12, 1), "emo": vocab_texts(10, 2), "ner": vocab_texts(9, 3)}
    res = fidelity(kinds_merged, dict.fromkeys(("seq", "emo", "ner"), kinds_merged), texts, batch_size=4)
    assert set(res) == {"seq", "emo", "ner"}
    for task, r in res.items():
        assert r["n"] == len(texts[task]) and r["off_task_n"] == 31 - len(texts[task])
        for prefix in ("", "off_task_"):
            assert r[f"{prefix}agreement"] == r[f"{prefix}agreement_low"] == r[f"{prefix}agreement_high"] == 1.0
            assert r[f"{prefix}flag_rate_diff"] == r[f"{prefix}flag_rate_diff_high"] == 0.0
            assert r[f"{prefix}flag_rate"] == r[f"{prefix}expert_flag_rate"]
    assert res["emo"]["label_agreement"] == res["emo"]["agreement/joy"] == 1.0
    assert res["ner"]["token_agreement"] == res["ner"]["off_task_token_agreement"] == 1.0


def test_merged_heads_against_their_experts(
    kinds: dict[str, Path], kinds_merged: MultiHeadModel, tmp_path: Path
) -> None:
    texts = {
        "seq": vocab_texts(20, 4),
        "emo": vocab_texts(20, 5),
        "ner": vocab_texts(20, 6),
        "other": vocab_texts(8, 7),
    }
    experts = {t: load_any(kinds[t], t) for t in ("seq", "emo", "ner")}
    # the seq expert with its bias moved so that its decision boundary cuts its own margins at
    # their median: it answers "injection" on about half the texts, the merged head on all or none
    margin = experts["seq"].logits(texts["seq"])["seq"] @ torch.tensor([-1.0, 1.0])
    shift = float(margin.median())

    def move(state: dict[str, torch.Tensor]) -> None:
        state["classifier.bias"] += torch.tensor([shift / 2, -shift / 2])

    moved = copy_expert(kinds["seq"], tmp_path / "moved")
    edit_weights(moved, move)
    experts["seq"] = load_any(moved)  # its one head has another name: the only head is compared
    res = fidelity(kinds_merged, experts, texts, batch_size=8)
    assert set(res) == {"seq", "emo", "ner"}
    for r in res.values():
        assert r["n"] == 20 and r["off_task_n"] == 48  # "other" is everyone's off-task traffic
        for name in ("agreement", "off_task_agreement", "flag_rate_diff"):
            assert r[f"{name}_low"] <= r[name] <= r[f"{name}_high"]
        assert r["flag_rate_diff"] == pytest.approx(r["flag_rate"] - r["expert_flag_rate"])
    # the single-label agreement, by hand, from each model's logits on the seq texts
    mine = kinds_merged.logits(texts["seq"], tasks=["seq"])["seq"].argmax(-1)
    (theirs,) = experts["seq"].logits(texts["seq"]).values()  # its one head, under another name
    theirs = theirs.argmax(-1)
    assert res["seq"]["agreement"] == pytest.approx(float((mine == theirs).float().mean()))
    assert 0.0 < res["seq"]["agreement"] < 1.0 and res["seq"]["agreement_low"] < res["seq"]["agreement_high"]
    # two labels, "benign" benign: a text is flagged where "injection" wins
    flag_diff = float((mine == 1).float().mean() - (theirs == 1).float().mean())
    assert res["seq"]["flag_rate_diff"] == pytest.approx(flag_diff) and flag_diff != 0.0
    assert 0.0 <= res["ner"]["agreement"] <= 1.0 and 0.0 <= res["ner"]["token_agreement"] <= 1.0
    table = fidelity_table(res)
    assert table.splitlines()[0].startswith("head") and "off-task agreement" in table
    assert f"{res['seq']['agreement']:.3f} [{res['seq']['agreement_low']:.3f}" in table


def test_compare_logits_reuses_expert_logits_and_checks_their_rows(
    kinds: dict[str, Path], kinds_merged: MultiHeadModel
) -> None:
    texts = {"seq": vocab_texts(10, 11), "emo": vocab_texts(7, 12)}
    experts = {t: load_any(kinds[t], t) for t in ("seq", "emo")}
    pool = texts["seq"] + texts["emo"]
    mine = head_logits(kinds_merged, pool, ["seq", "emo"])
    theirs = {t: head_logits(m, pool, [t])[t] for t, m in experts.items()}
    assert compare_logits(kinds_merged, texts, mine, theirs) == fidelity(kinds_merged, experts, texts)
    with pytest.raises(GuardmergeError, match="expert 'emo': 16 rows of logits, 17 texts"):
        compare_logits(kinds_merged, texts, mine, {**theirs, "emo": theirs["emo"][1:]})


def test_wrong_experts_and_texts_are_named(kinds: dict[str, Path], kinds_merged: MultiHeadModel) -> None:
    texts = {"seq": vocab_texts(4, 8)}
    with pytest.raises(GuardmergeError, match="merged model has no head 'nope'"):
        fidelity(kinds_merged, {"nope": load_any(kinds["seq"], "nope")}, texts)
    with pytest.raises(GuardmergeError, match="expert 'seq': a multi-label head"):
        fidelity(kinds_merged, {"seq": load_any(kinds["emo"], "seq")}, texts)
    with pytest.raises(DataError, match="texts of 'seq': none"):
        fidelity(kinds_merged, {"seq": load_any(kinds["seq"], "seq")}, {"seq": []})
    with pytest.raises(GuardmergeError, match="--benign: no compared head 'emo'"):
        fidelity(kinds_merged, {"seq": load_any(kinds["seq"], "seq")}, texts, benign={"emo": ["neutral"]})


# -- the command line: guardmerge eval MERGED --experts ------------------------------------------


def test_expert_folders_from_items_or_the_merge_config(merged_folder: Path, zoo: dict[str, Path]) -> None:
    assert expert_folders(merged_folder) == {"hate": str(zoo["hate"]), "sentiment": str(zoo["sentiment"])}
    assert expert_folders(merged_folder, [f"hate={zoo['hate']}"]) == {"hate": str(zoo["hate"])}
    with pytest.raises(ConfigError, match="'hate' must look like TASK=FOLDER"):
        expert_folders(merged_folder, ["hate"])
    with pytest.raises(ConfigError, match="no folder given"):
        expert_folders(merged_folder, ["hate="])
    with pytest.raises(ConfigError, match="given twice"):
        expert_folders(merged_folder, ["hate=a", "hate=b"])
    with pytest.raises(ConfigError, match=r"merge_config\.yaml not found"):
        expert_folders(zoo["hate"])


def test_fidelity_texts_read_unlabelled_files_and_task_folders(tmp_path: Path) -> None:
    plain = tmp_path / "traffic.txt"
    plain.write_text("first text\n\nsecond text\n")
    data = tmp_path / "data"
    (data / "hate").mkdir(parents=True)
    (data / "hate" / "labels.json").write_text(json.dumps({"labels": ["not-hate", "hate"]}))
    texts_jsonl(data / "hate", "test.jsonl", ["a b", "c d", "e f"])  # no labels in the rows
    (data / "spam").mkdir()
    (data / "spam" / "labels.json").write_text(json.dumps({"labels": ["ham", "spam"]}))  # no test split
    out = fidelity_texts(data, [f"hate={plain}", f"web={plain}"], limit=2)
    assert out == {"hate": ["a b", "c d", "first text", "second text"], "web": ["first text", "second text"]}
    with pytest.raises(GuardmergeError, match="needs texts"):
        fidelity_texts(None, [])
    with pytest.raises(DataError, match="missing.txt"):
        fidelity_texts(None, [f"hate={tmp_path / 'missing.txt'}"])


def test_eval_experts_end_to_end_on_unlabelled_texts(merged_folder: Path, zoo: dict[str, Path], tmp_path: Path) -> None:
    hate = tmp_path / "hate.txt"
    hate.write_text("\n".join(random_texts(14, seed=1)) + "\n")
    sentiment = texts_jsonl(tmp_path, "sentiment.jsonl", random_texts(11, seed=2))  # {"text"} rows only
    out = tmp_path / "fidelity.json"
    args = ["eval", str(merged_folder), "--experts", "--texts", f"hate={hate}", "--texts", f"sentiment={sentiment}"]
    res = runner.invoke(app, [*args, "--out", str(out), "--no-progress", "--benign", "sentiment=neu"])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert set(report) == {"hate", "sentiment"}
    assert report["hate"]["n"] == 14 and report["hate"]["off_task_n"] == 11 and report["sentiment"]["n"] == 11
    for r in report.values():
        assert r["agreement_low"] <= r["agreement"] <= r["agreement_high"]
        assert "flag_rate_diff" in r and "off_task_agreement_high" in r
    assert "off-task agreement" in res.output and "hate" in res.output.splitlines()[2]
    # the same merge, its experts named: one head only; the report is reproducible
    again = tmp_path / "again.json"
    res = runner.invoke(app, [*args, "-e", f"hate={zoo['hate']}", "--out", str(again), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads(again.read_text()) == {"hate": report["hate"]}
    refused = runner.invoke(app, [*args, "--out", str(out)])  # --out is never replaced without --force
    assert refused.exit_code != 0 and json.loads(out.read_text()) == report


def test_eval_experts_bad_values_are_clear_errors(merged_folder: Path, zoo: dict[str, Path], tmp_path: Path) -> None:
    texts = texts_jsonl(tmp_path)
    base = ["eval", str(merged_folder), "--experts", "--texts", f"hate={texts}", "--no-progress"]
    res = runner.invoke(app, [*base, "-e", "hate"])
    assert isinstance(res.exception, ConfigError) and "--expert 'hate' must look like TASK=FOLDER" in str(res.exception)
    res = runner.invoke(app, [*base, "-e", f"injection={zoo['injection']}"])
    assert isinstance(res.exception, GuardmergeError)
    assert "expert 'injection': the merged model has no head 'injection'" in str(res.exception)
    bare = tmp_path / "bare"
    shutil.copytree(merged_folder, bare)
    (bare / "merge_config.yaml").unlink()
    res = runner.invoke(app, ["eval", str(bare), "--experts", "--texts", f"hate={texts}"])
    assert isinstance(res.exception, ConfigError) and "merge_config.yaml not found" in str(res.exception)
    res = runner.invoke(app, ["eval", str(merged_folder), "--texts", f"hate={texts}"])
    assert isinstance(res.exception, GuardmergeError) and "go with --experts" in str(res.exception)
