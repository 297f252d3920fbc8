"""The heal stage (guardmerge.merge.heal, docs/algorithms.md 3c): label-free distillation of the
merged model from the experts, on tiny random BERT models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import guardmerge
from guardmerge.cli import app
from guardmerge.config import HealConfig, load_config, parse_config
from guardmerge.errors import ConfigError
from guardmerge.merge import heal as heal_module
from guardmerge.merge.engine import merge
from guardmerge.merge.heal import (
    bucketed_batches,
    heal_dtype,
    heal_model,
    heal_pool,
    plan_batches,
    teacher_key,
    teacher_outputs,
)
from guardmerge.merge.job import MergeJob
from guardmerge.merge.stages import build, merge_to_folder
from guardmerge.models.head_kinds import head_kind
from tests.builders import NER, copy_expert, edit_weights, expert_logits, make_classifier, make_expert, random_texts

POOL = random_texts(200)
QUICK = {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "texts": 60, "holdout": 0.0}
"""One short epoch, no held-out slice (the last state is kept): the zoo's experts sit so close to
their merge that early stopping would keep the start."""


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test caches teacher outputs in its own folder."""
    monkeypatch.setenv("GUARDMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "heal"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("heal-data") / "texts.txt"
    path.write_text("\n".join(POOL) + "\n")
    return path


@pytest.fixture(scope="module")
def far_expert(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-label expert far from its base (task vector scale 0.3): a merge at scaling 0.3 is
    clearly not the expert."""
    return make_expert(tmp_path_factory.mktemp("far") / "far", zoo["base"], ["neg", "neu", "pos"], seed=3, scale=0.3)


def config(zoo: dict[str, Path], data: Path | dict[str, Path], tasks=("hate", "sentiment"), **over: object):
    """Task arithmetic of the zoo's ``tasks``, each reading ``data`` (one file or per task), heal on."""
    files = data if isinstance(data, dict) else dict.fromkeys(tasks, data)
    experts = [{"model": str(zoo[t]), "task": t, **({"data": str(files[t])} if files.get(t) else {})} for t in tasks]
    raw = {
        "base_model": str(zoo["base"]),
        "experts": experts,
        "parameters": {"scaling": 0.4},
        "align_heads": False,
        "heal": dict(QUICK),
    }
    raw.update(over)
    return parse_config(raw)


def test_heal_with_one_expert_reproduces_the_expert(zoo: dict[str, Path], far_expert: Path, data_file: Path) -> None:
    """Tolerance: on the pool's texts every softmax probability within 0.05 of the expert's after
    50 epochs (it starts about 0.3 away); the held-out slice is off, so the last state is kept."""
    heal = {"epochs": 50, "learning_rate": 1e-2, "batch_size": 16, "temperature": 1.0, "holdout": 0.0, "warmup": 0.0}
    raw = {
        "base_model": str(zoo["base"]),
        "experts": [{"model": str(far_expert), "task": "s", "data": str(data_file), "benign": ["neu"]}],
        "parameters": {"scaling": 0.3},
        "align_heads": False,
    }
    texts = POOL[:60]
    expert = expert_logits(far_expert, texts).softmax(-1)
    plain = merge(MergeJob.of(parse_config(raw)), progress=False).to_model().logits(texts)["s"].softmax(-1)
    assert (plain - expert).abs().max() > 0.1  # the training-free start is not the expert
    res = build(MergeJob.of(parse_config({**raw, "heal": heal})), progress=False)
    healed = res.to_model().logits(texts)["s"].softmax(-1)
    assert (healed - expert).abs().max() < 0.05
    info = res.info["heal"]
    assert info["pool"] == {"texts": 200, "train": 200, "holdout": 0, "tasks": {"s": 200}}
    assert info["steps"]["done"] == info["steps"]["planned"] == 50 * 13
    assert info["loss_after"] < info["loss_before"] / 100
    assert info["agreement_after"] > info["agreement_before"]


def test_early_stopping_keeps_the_best_state_the_training_free_start_included(
    zoo: dict[str, Path], data_file: Path
) -> None:
    heal = {**QUICK, "learning_rate": 5e-2, "epochs": 3, "holdout": 0.2, "patience": 1}
    res = build(MergeJob.of(config(zoo, data_file, heal=heal)), progress=False)
    info = res.info["heal"]
    assert info["steps"]["kept"] == 0 and info["steps"]["done"] < info["steps"]["planned"]  # stopped early
    assert info["history"][1]["loss"] > info["history"][0]["loss"]  # training hurt on the held-out slice
    assert info["agreement_after"] == info["agreement_before"] and info["loss_after"] == info["loss_before"]
    plain = merge(MergeJob.of(config(zoo, data_file, heal=None)), progress=False).tensors
    assert all(torch.equal(plain[k], res.tensors[k]) for k in plain)


def test_heal_never_reads_labels(zoo: dict[str, Path], tmp_path: Path) -> None:
    texts = POOL[:60]
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(texts) + "\n")
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts)))
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text(
        "".join(json.dumps({"text": t, "label": ["?", None, -7, {"x": 1}][i % 4]}) + "\n" for i, t in enumerate(texts))
    )
    heal = {**QUICK, "cache": False}
    results = [build(MergeJob.of(config(zoo, f, heal=heal)), progress=False) for f in (plain, labelled, corrupt)]
    untouched = merge(MergeJob.of(config(zoo, plain, heal=None)), progress=False)
    first = results[0].tensors
    assert any(not torch.equal(first[k], untouched.tensors[k]) for k in first)  # heal trained something
    for other in results[1:]:
        assert first.keys() == other.tensors.keys()
        assert all(torch.equal(first[k], other.tensors[k]) for k in first)


def test_teacher_outputs_are_cached_and_invalidated_when_an_expert_changes(
    zoo: dict[str, Path], data_file: Path, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[str] = []
    real = heal_module.teacher_outputs

    def counted(expert, task, texts, **kw):  # type: ignore[no-untyped-def]
        runs.append(task)
        return real(expert, task, texts, **kw)

    monkeypatch.setattr(heal_module, "teacher_outputs", counted)
    hate = copy_expert(zoo["hate"], tmp_path / "hate")
    experts = {**zoo, "hate": hate}
    first = build(MergeJob.of(config(experts, data_file)), progress=False)
    assert sorted(runs) == ["hate", "sentiment"] and len(list(cache_dir.glob("*.safetensors"))) == 2
    assert first.info["heal"]["teachers_cached"] == {"hate": False, "sentiment": False}
    second = build(MergeJob.of(config(experts, data_file)), progress=False)
    assert len(runs) == 2 and second.info["heal"]["teachers_cached"] == {"hate": True, "sentiment": True}
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    edit_weights(hate, lambda s: s["classifier.weight"].mul_(2.0))
    third = build(MergeJob.of(config(experts, data_file)), progress=False)
    assert runs == ["hate", "sentiment", "hate"]
    assert third.info["heal"]["teachers_cached"] == {"hate": False, "sentiment": True}


def test_multi_label_and_token_heads_are_distilled(zoo: dict[str, Path], tmp_path: Path, data_file: Path) -> None:
    base = zoo["base"]
    folders = {
        "tox": make_classifier(tmp_path / "tox", base, ["insult", "threat", "obscene"], 5, kind="multi_label"),
        "pii": make_classifier(tmp_path / "pii", base, list(NER), 6, kind="token"),
    }
    cfg = parse_config(
        {
            "base_model": str(base),
            "experts": [{"model": str(f), "task": t, "data": str(data_file)} for t, f in folders.items()],
            "parameters": {"scaling": 0.4},
            "align_heads": False,
        }
    )
    job = MergeJob.of(cfg)
    pool, sizes = heal_pool(job.texts(80), 80)
    assert sizes == {"tox": 80, "pii": 80} and len(pool) == 80  # the same file twice: pooled once
    with job.open():
        model = merge(job, progress=False).to_model()
        with torch.no_grad():  # a toy task: heads far from their experts
            for p in model.heads.parameters():
                p.normal_(0, 0.5)
        teachers = {t: teacher_outputs(job.expert_model(t), t, pool, max_length=64, batch_size=16) for t in folders}
    assert teachers["tox"].rows.shape == (80, 3)
    assert teachers["pii"].rows.shape[0] == int(teachers["pii"].counts.sum()) > 80  # one row per token
    heal = HealConfig(epochs=8, learning_rate=3e-3, batch_size=16, holdout=0.25, patience=8, max_length=64)
    report = heal_model(model, pool, teachers, heal, progress=False)
    assert report["loss_after"] < 0.5 * report["loss_before"]
    for task in folders:
        assert report["tasks"][task]["after"] > report["tasks"][task]["before"], (task, report["tasks"])


def test_train_heads_leaves_the_encoder_bit_identical_and_top_the_lower_blocks(
    zoo: dict[str, Path], data_file: Path
) -> None:
    plain = merge(MergeJob.of(config(zoo, data_file, heal=None)), progress=False).tensors
    heads = build(MergeJob.of(config(zoo, data_file, heal={**QUICK, "train": "heads"})), progress=False).tensors
    changed = sorted(k for k in plain if not torch.equal(plain[k], heads[k]))
    assert changed and all(k.startswith("heads.") for k in changed)
    top = build(
        MergeJob.of(config(zoo, data_file, heal={**QUICK, "train": "top", "top_blocks": 1})), progress=False
    ).tensors
    changed = {k for k in plain if not torch.equal(plain[k], top[k])}
    assert any(k.startswith("encoder.layer.1.") for k in changed) and any(k.startswith("heads.") for k in changed)
    assert not any(k.startswith(("encoder.layer.0.", "embeddings.")) for k in changed)


def test_a_task_weight_of_0_leaves_its_head_untrained(zoo: dict[str, Path], data_file: Path) -> None:
    plain = merge(MergeJob.of(config(zoo, data_file, heal=None)), progress=False).tensors
    heal = {**QUICK, "train": "heads", "weights": {"hate": 0.0}}
    res = build(MergeJob.of(config(zoo, data_file, heal=heal)), progress=False).tensors
    changed = {k.split(".")[1] for k in plain if not torch.equal(plain[k], res[k])}
    assert changed == {"sentiment"}


def test_heal_trains_the_branches_and_the_write_carries_the_healed_model(
    zoo: dict[str, Path], data_file: Path, tmp_path: Path
) -> None:
    job = MergeJob.of(config(zoo, data_file, share_layers=1, align_heads=True))
    plain = merge(job, progress=False).tensors
    first, second = (build(job, progress=False) for _ in range(2))
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)  # seeded: deterministic
    branch = "branches.hate.encoder.layer.1.output.dense.weight"
    assert not torch.equal(first.tensors[branch], plain[branch])
    out = merge_to_folder(job, tmp_path / "healed", progress=False)
    loaded = guardmerge.load(str(out))
    written = loaded.state_tensors()
    assert all(torch.equal(written[k], first.tensors[k]) for k in first.tensors if k in written)
    card = (out / "README.md").read_text()
    assert "Healed" in card and "the one stage that trains weights" in card and "agreement with the experts" in card
    info = json.loads((out / "config.json").read_text())["guardmerge"]
    assert info["heal"]["pool"]["tasks"] == {"hate": 60, "sentiment": 60} and "align_heads" in info


def test_heal_without_a_task_s_data_fails_before_writing_anything(
    zoo: dict[str, Path], data_file: Path, tmp_path: Path
) -> None:
    cfg = config(zoo, {"hate": data_file}).model_dump()
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["merge", str(path), str(out), "--no-progress"])
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError)
    assert "heal" in str(res.exception) and "sentiment" in str(res.exception) and "hate" not in str(res.exception)
    assert not out.exists() and not list(tmp_path.glob(".*out*"))


def test_heal_config_validation(zoo: dict[str, Path], data_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"heal\.weights: unknown task\(s\) hat;"):
        MergeJob.of(config(zoo, data_file, heal={"weights": {"hat": 2.0}}))
    with pytest.raises(ConfigError, match=r"heal\.weights: every task's loss weight is 0"):
        MergeJob.of(config(zoo, data_file, heal={"weights": {"hate": 0, "sentiment": 0}}))
    with pytest.raises(ConfigError, match=r"heal\.weights: weight of task 'hate' is -1"):
        config(zoo, data_file, heal={"weights": {"hate": -1}})
    with pytest.raises(ConfigError, match=r"heal\.train: Input should be 'all', 'top' or 'heads'"):
        config(zoo, data_file, heal={"train": "encoder"})
    with pytest.raises(ConfigError, match=r"heal\.epoch: Extra inputs"):
        config(zoo, data_file, heal={"epoch": 2})
    with pytest.raises(ConfigError, match=r"heal\.holdout: Input should be less than 1"):
        config(zoo, data_file, heal={"holdout": 1.0})
    with pytest.raises(ConfigError, match="heal trains a multi-head model"):
        MergeJob.of(config(zoo, data_file, heads="shared"))
    job = MergeJob.of(config(zoo, data_file, heal={**QUICK, "weights": {"hate": 0.5}}))
    assert job.needs_data and job.text_count() == QUICK["texts"]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(config(zoo, data_file, heal=None).model_dump()))
    assert load_config(path).heal is None
    assert load_config(path, ["heal.epochs=3", "heal.train=top"]).heal == HealConfig(epochs=3, train="top")


def test_distill_losses_by_head_kind() -> None:
    torch.manual_seed(0)
    student, teacher, t = torch.randn(4, 3), torch.randn(4, 3), 2.0
    kl = torch.nn.functional.kl_div(
        (student / t).log_softmax(-1), (teacher / t).log_softmax(-1), log_target=True, reduction="batchmean"
    )
    mask = torch.ones(4, 5)
    torch.testing.assert_close(head_kind("single_label").distill_loss(student, teacher, mask, t), kl * t * t)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(student, teacher.sigmoid())
    torch.testing.assert_close(head_kind("multi_label").distill_loss(student, teacher, mask, t), bce)
    assert float(head_kind("single_label").distill_loss(teacher, teacher, mask, t)) == pytest.approx(0.0, abs=1e-6)
    tokens_s, tokens_t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    token = head_kind("token").distill_loss
    loss = token(tokens_s, tokens_t, mask, 1.0)
    tokens_s[0, 3], tokens_s[1, 2:] = 100.0, -100.0  # padding never counts
    assert torch.equal(token(tokens_s, tokens_t, mask, 1.0), loss)
    keep = mask.bool()
    ref = torch.nn.functional.kl_div(
        tokens_s[keep].log_softmax(-1), tokens_t[keep].log_softmax(-1), log_target=True, reduction="batchmean"
    )
    torch.testing.assert_close(loss, ref)


def test_batches_keep_to_the_text_and_token_budgets() -> None:
    lengths = [10, 50, 20, 200, 5, 5, 5]
    batches = plan_batches(lengths, range(7), batch_size=3, max_tokens=100)
    assert [i for b in batches for i in b] == list(range(7))
    assert batches == [[0, 1], [2], [3], [4, 5, 6]]  # 200 tokens over budget: alone
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100)
    assert plan_batches([4] * 5, range(5), batch_size=2, max_tokens=1000) == [[0, 1], [2, 3], [4]]


def test_bucketed_batches_take_every_text_once_with_little_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.choice([8, 9, 10, 120]) for _ in range(500)]
    order = list(range(500))
    rng.shuffle(order)
    batches = bucketed_batches(lengths, order, batch_size=16, max_tokens=4096, rng=random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert batches == bucketed_batches(lengths, order, batch_size=16, max_tokens=4096, rng=random.Random(1))

    def padded(bs: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    plain = plan_batches(lengths, order, 16, 4096)
    assert padded(batches) < 0.6 * padded(plain)  # a quarter of long texts: most plain batches hold one
    in_order = [
        b
        for s in range(0, 500, 16 * 32)
        for b in plan_batches(lengths, sorted(order[s : s + 512], key=lengths.__getitem__), 16, 4096)
    ]
    assert batches != in_order and sorted(batches) == sorted(in_order)  # the same batches, shuffled


def test_teacher_outputs_keep_text_order_whatever_the_length_order(zoo: dict[str, Path], tmp_path: Path) -> None:
    texts = [POOL[0] + " and much more text" * 6, POOL[1], POOL[2] + " longer" * 3, POOL[3]]
    cfg = parse_config(
        {
            "base_model": str(zoo["base"]),
            "experts": [
                {"model": str(zoo["hate"]), "task": "hate"},
                {
                    "model": str(make_classifier(tmp_path / "pii", zoo["base"], list(NER), 6, kind="token")),
                    "task": "pii",
                },
            ],
            "align_heads": False,
        }
    )
    job = MergeJob.of(cfg)
    with job.open():
        hate = teacher_outputs(job.expert_model("hate"), "hate", texts, max_length=64, batch_size=2)
        pii = teacher_outputs(job.expert_model("pii"), "pii", texts, max_length=64, batch_size=2)
        one = [teacher_outputs(job.expert_model("pii"), "pii", [t], max_length=64, batch_size=1) for t in texts]
    torch.testing.assert_close(hate.rows, expert_logits(zoo["hate"], texts), atol=1e-5, rtol=1e-4)
    assert pii.counts.tolist() == [int(o.counts[0]) for o in one] and len(set(pii.counts.tolist())) > 1
    torch.testing.assert_close(pii.rows, torch.cat([o.rows for o in one]), atol=1e-5, rtol=1e-4)


def test_precision_resolves_and_keys_the_teacher_cache(zoo: dict[str, Path]) -> None:
    cpu = torch.device("cpu")
    assert heal_dtype("float32", cpu) is None and heal_dtype("bfloat16", cpu) is torch.bfloat16
    assert heal_dtype("auto", cpu) in (None, torch.bfloat16)
    keys = {teacher_key(zoo["hate"], POOL[:5], 64, dtype) for dtype in (None, torch.bfloat16)}
    assert len(keys) == 2  # bfloat16 outputs never stand in for float32 ones
    with pytest.raises(ConfigError, match="precision"):
        parse_config(
            {"base_model": str(zoo["base"]), "experts": [{"model": str(zoo["hate"])}], "heal": {"precision": "fp8"}}
        )


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_heal_learns_in_either_precision(
    zoo: dict[str, Path], far_expert: Path, data_file: Path, precision: str
) -> None:
    heal = {**QUICK, "epochs": 4, "learning_rate": 1e-2, "warmup": 0.0, "precision": precision}  # last state kept
    raw = {
        "base_model": str(zoo["base"]),
        "experts": [{"model": str(far_expert), "task": "s", "data": str(data_file), "benign": ["neu"]}],
        "parameters": {"scaling": 0.3},
        "align_heads": False,
        "heal": heal,
    }
    info = build(MergeJob.of(parse_config(raw)), progress=False).info["heal"]
    assert info["precision"] == precision and info["measured_on"] == "train"
    assert info["loss_after"] < 0.5 * info["loss_before"]
