"""The multi-head module: predict, one encoder pass per batch, unknown tasks, outputs that are not finite."""

from pathlib import Path

import pytest
import torch

from guardmerge.config import parse_config
from guardmerge.errors import GuardmergeError
from guardmerge.merge.job import MergeJob
from guardmerge.models.multihead import MultiHeadModel
from tests.builders import TEXTS


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


def test_unknown_task_is_named(merged: MultiHeadModel) -> None:
    with pytest.raises(GuardmergeError, match="unknown task 'spam'.*hate"):
        merged.predict(TEXTS, tasks=["spam"])


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
