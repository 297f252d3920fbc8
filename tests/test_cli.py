"""The command line, run as a user would (subprocess for exit codes, CliRunner for speed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from guardmerge.cli import app

runner = CliRunner()


def write(tmp_path: Path, zoo: dict[str, Path], **over: object) -> Path:
    data = {
        "base_model": str(zoo["base"]),
        "experts": [{"model": str(zoo["hate"]), "task": "hate"}, {"model": str(zoo["sentiment"]), "task": "sentiment"}],
        "method": "task_arithmetic",
        "parameters": {"scaling": 0.5},
        "heads": "multi",
    }
    data.update(over)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guardmerge.cli", *args], capture_output=True, text=True)


def test_merge_then_predict_json_and_table(zoo: dict[str, Path], tmp_path: Path) -> None:
    cfg = write(tmp_path, zoo)
    res = runner.invoke(
        app, ["merge", str(cfg), str(tmp_path / "out"), "--no-progress", "-s", "parameters.scaling=0.7"]
    )
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())
    assert saved["parameters"] == {"scaling": 0.7}
    res = runner.invoke(app, ["predict", str(tmp_path / "out"), "i love this", "you people are terrible", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.strip().splitlines()]
    assert [r["text"] for r in rows] == ["i love this", "you people are terrible"]
    assert rows[0]["sentiment"]["label"] in {"neg", "neu", "pos"} and 0 < rows[0]["hate"]["score"] <= 1
    table = runner.invoke(app, ["predict", str(tmp_path / "out"), "i love this"])
    assert "hate" in table.output and "sentiment" in table.output


def test_methods_lists_registry_with_parameters() -> None:
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    assert "task_arithmetic" in res.output and "scaling" in res.output and "average" in res.output
    data = json.loads(runner.invoke(app, ["methods", "--json"]).output)
    assert data["task_arithmetic"]["parameters"]["scaling"]["default"] == "0.3"


def test_export_command(zoo: dict[str, Path], tmp_path: Path) -> None:
    cfg = write(tmp_path, zoo)
    assert runner.invoke(app, ["merge", str(cfg), str(tmp_path / "m"), "--no-progress"]).exit_code == 0
    res = runner.invoke(app, ["export", str(tmp_path / "m"), "sentiment", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "config.json").read_text())["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}


@pytest.mark.parametrize(
    "over, message",
    [
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"parameters": {"scaling": 1, "densty": 0.2}}, "densty"),
        ({"experts": [{"model": "a", "task": "x"}, {"model": "b", "task": "x"}]}, "duplicate task names: x"),
    ],
)
def test_bad_config_exits_2_with_one_line_error(zoo: dict[str, Path], tmp_path: Path, over: dict, message: str) -> None:
    proc = cli("merge", str(write(tmp_path, zoo, **over)), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_existing_out_refused_unless_force(zoo: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    proc = cli("merge", str(write(tmp_path, zoo)), str(tmp_path / "out"))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = cli("-q", "merge", str(write(tmp_path, zoo)), str(tmp_path / "out"), "--force", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("merged 2 experts")  # printed and flushed before the fast exit
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left beside it


def test_help_explains_commands() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("merge", "predict", "methods", "export", "finetune", "eval", "demo"):
        assert command in proc.stdout


def test_self_merge_at_full_density_reproduces_the_expert(zoo: dict[str, Path], tmp_path: Path) -> None:
    from tests.builders import TEXTS, expert_logits

    res = runner.invoke(
        app,
        [
            "self-merge",
            str(zoo["sentiment"].parent / "base"),
            str(zoo["sentiment"]),
            str(tmp_path / "self"),
            "--method",
            "task_arithmetic",
            "-s",
            "scaling=1.0",
        ],
    )
    assert res.exit_code == 0, res.output
    import torch

    assert torch.allclose(expert_logits(tmp_path / "self", TEXTS), expert_logits(zoo["sentiment"], TEXTS), atol=1e-6)


def test_stats_command_then_regmean_merge_from_the_file(zoo: dict[str, Path], tmp_path: Path) -> None:
    from tests.test_refit import TEXTS

    data = tmp_path / "t.txt"
    data.write_text("\n".join(TEXTS))
    files = {}
    for task in ("hate", "sentiment"):
        files[task] = tmp_path / f"{task}.safetensors"
        res = runner.invoke(
            app,
            [
                "stats",
                str(zoo[task]),
                "--data",
                str(data),
                "--out",
                str(files[task]),
                "-k",
                "gram",
                "--max-examples",
                "30",
            ],
        )
        assert res.exit_code == 0, res.output
    cfg = write(
        tmp_path,
        zoo,
        method="regmean",
        parameters={"alpha": 0.9},
        experts=[{"model": str(zoo[t]), "task": t, "stats": str(files[t])} for t in ("hate", "sentiment")],
    )
    res = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "rm"), "--no-progress"])
    assert res.exit_code == 0, res.output
    # swapped statistics files are refused, naming the file, and nothing is written
    swapped = write(
        tmp_path,
        zoo,
        method="regmean",
        experts=[{"model": str(zoo["hate"]), "task": "hate", "stats": str(files["sentiment"])}],
    )
    proc = cli("merge", str(swapped), str(tmp_path / "bad"))
    assert (
        proc.returncode == 2 and "belongs to another expert" in proc.stderr and "sentiment.safetensors" in proc.stderr
    )
    assert not (tmp_path / "bad").exists()


def test_eval_command_writes_task_metric_json_with_normalised_scores(zoo: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    for task, labels in (("hate", ["not-hate", "hate"]), ("sentiment", ["neg", "neu", "pos"])):
        (data / task).mkdir(parents=True)
        (data / task / "labels.json").write_text(json.dumps({"labels": labels}))
        rows = [
            {"text": t, "label": i % len(labels)}
            for i, t in enumerate(["i love this", "you people are terrible", "sure", "why"])
        ]
        (data / task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write(tmp_path, zoo)
    assert runner.invoke(app, ["merge", str(cfg), str(tmp_path / "m"), "--no-progress"]).exit_code == 0
    res = runner.invoke(
        app,
        [
            "eval",
            str(tmp_path / "m"),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "r.json"),
            "-e",
            f"hate={zoo['hate']}",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "r.json").read_text())
    assert set(out) == {"hate", "sentiment"}
    assert 0 <= out["hate"]["macro_f1"] <= 1 and 0 <= out["sentiment"]["accuracy"] <= 1
    assert "normalized" in out["hate"] and "normalized" not in out["sentiment"]
