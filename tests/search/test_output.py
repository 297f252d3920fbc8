"""``guardmerge search`` end to end: the best merge written as a normal model with its summary."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

import guardmerge
from guardmerge.cli import app
from tests.search.conftest import TASKS, zoo_config

runner = CliRunner()


def test_search_command_writes_the_best_merge_with_summary_plot_and_card(
    search_zoo: dict[str, Path], val_data: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump(zoo_config(search_zoo, method="dare_ties").model_dump()))
    out = tmp_path / "best"
    args = ["search", str(cfg), "--data", str(val_data), "--out", str(out), "--weights", "0.5,1.5", "--no-progress"]
    res = runner.invoke(app, [*args, "--trials", "5"])
    assert res.exit_code == 0, res.output
    assert "best of 5 trials" in res.output and "s/trial" in res.output
    summary = json.loads((out / "search.json").read_text())
    assert len(summary["trials"]) == 5 and set(summary["best"]["scores"]) == set(TASKS)
    assert set(summary["space"]["ranges"]) == {"density", "scaling", "seed"}
    assert (out / "search_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Search" in (out / "README.md").read_text()
    written = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert written["parameters"]["density"] == summary["best"]["parameters"]["density"]
    assert [e["weight"] for e in written["experts"]] == summary["best"]["weights"]
    model = guardmerge.load(str(out))
    assert model.tasks == list(TASKS)
    # the study persisted beside OUT: --resume continues it to 7 trials
    res = runner.invoke(app, [*args, "--trials", "7", "--resume", "--force"])
    assert res.exit_code == 0, res.output
    assert len(json.loads((out / "search.json").read_text())["trials"]) == 7
    lines = (tmp_path / "best.search" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 7


def test_search_command_refuses_bad_options_before_any_trial(
    search_zoo: dict[str, Path], val_data: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump(zoo_config(search_zoo, method="ties").model_dump()))
    base = ["search", str(cfg), "--data", str(val_data), "--out", str(tmp_path / "o"), "--no-progress"]
    for extra, message in (
        (["--weights", "2"], "LOW,HIGH"),
        (["--params", "alpha"], "no parameter 'alpha'"),
        (["--objective", "median"], "choose mean, worst or weighted"),
    ):
        res = runner.invoke(app, base + extra)
        assert res.exit_code != 0 and message in str(res.exception) + res.output, (extra, res.output)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.search" / "study.db").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["search", str(cfg), "--data", str(empty), "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code != 0 and "no folder for task" in str(res.exception)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.search").exists()  # nothing left behind
