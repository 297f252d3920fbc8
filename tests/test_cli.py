"""The command line, run as a user would (subprocess for exit codes, CliRunner for speed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from guardmerge.cli import app, main
from tests.builders import TEXTS, copy_expert, digest, edit_weights, merge_cfg, pickle_only, texts_jsonl

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
    assert data["methods"]["task_arithmetic"]["parameters"]["scaling"]["default"] == "0.3"
    assert data["steps"]["heal"]["settings"]["train"]["default"] == "'all'"
    assert "trains weights" in data["steps"]["heal"]["summary"] and set(data["steps"]) >= {"statistics", "align_heads"}


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
    from tests.builders import expert_logits

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
    from tests.builders import RANDOM_TEXTS

    data = tmp_path / "t.txt"
    data.write_text("\n".join(RANDOM_TEXTS))
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


# -- hostile or broken inputs refused with one clean line (security review, issue 17) ----------------


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the console entry point in-process (for refusals: a success of merge exits the process)."""
    monkeypatch.setattr(sys, "argv", ["guardmerge", *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    return int(info.value.code or 0), err


def assert_clean_refusal(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def own_zoo(tmp_path: Path, zoo: dict[str, Path]) -> dict[str, Path]:
    """A private copy of the zoo in one folder (so a refusal can be checked against its contents)."""
    root = tmp_path / "models"
    return {k: copy_expert(v, root / k) for k, v in zoo.items()}


def test_merge_force_onto_an_input_refused(
    tmp_path: Path, own_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = merge_cfg(tmp_path, own_zoo)
    before = digest(tmp_path / "models")
    for out, how in (
        (own_zoo["hate"], "is the input"),
        (tmp_path / "models", "contains the input"),
        (own_zoo["base"] / "sub", "lies inside the input"),
        (tmp_path, "contains the input"),
    ):
        code, err = run_cli(monkeypatch, capsys, "merge", str(cfg), str(out), "--force", "--no-progress")
        assert_clean_refusal(code, err, how)
    assert digest(tmp_path / "models") == before and cfg.is_file()


def test_out_dot_with_force_refused(
    tmp_path: Path, own_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = merge_cfg(tmp_path / "models", own_zoo)
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    code, err = run_cli(monkeypatch, capsys, "merge", str(cfg), ".", "--force", "--no-progress")
    assert_clean_refusal(code, err, "working directory")
    assert (work / "keep.txt").read_text() == "mine"


def test_export_and_onnx_onto_their_source_refused(
    tmp_path: Path, merged_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = copy_expert(merged_folder, tmp_path / "m")
    before = digest(src)
    for args in (
        ["export", str(src), "hate", str(src), "--force"],
        ["export-onnx", str(src), str(src), "--force"],
        ["export", str(src), "hate", str(src / "inner"), "--force"],
    ):
        code, err = run_cli(monkeypatch, capsys, *args)
        assert_clean_refusal(code, err, "input")
    assert digest(src) == before


def test_stats_out_onto_expert_weights_refused(
    tmp_path: Path, own_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = texts_jsonl(tmp_path)
    before = digest(own_zoo["hate"])
    code, err = run_cli(
        monkeypatch,
        capsys,
        "stats",
        str(own_zoo["hate"]),
        "--data",
        str(data),
        "--out",
        str(own_zoo["hate"] / "model.safetensors"),
        "--force",
    )
    assert_clean_refusal(code, err, "lies inside the input")
    code, err = run_cli(
        monkeypatch, capsys, "stats", str(own_zoo["hate"]), "--data", str(data), "--out", str(data), "--force"
    )
    assert_clean_refusal(code, err, "is the input")
    assert digest(own_zoo["hate"]) == before and data.read_text().count("\n") == len(TEXTS)


def test_self_merge_finetune_search_eval_onto_inputs_refused(
    tmp_path: Path, own_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = texts_jsonl(tmp_path)
    before = digest(tmp_path / "models")
    cases = [
        ["self-merge", str(own_zoo["base"]), str(own_zoo["hate"]), str(own_zoo["hate"]), "--force"],
        ["finetune", str(own_zoo["base"]), str(data), str(own_zoo["base"]), "--labels", "a,b", "--force"],
        ["finetune", str(own_zoo["base"]), str(data), str(tmp_path), "--labels", "a,b", "--force"],
        [
            "search",
            str(merge_cfg(tmp_path, own_zoo)),
            "--data",
            str(tmp_path),
            "--out",
            str(own_zoo["sentiment"]),
            "--force",
        ],
        ["eval", str(own_zoo["hate"]), "--data", str(tmp_path), "--out", str(data)],
    ]
    for args in cases:
        code, err = run_cli(monkeypatch, capsys, *args)
        assert_clean_refusal(code, err, "input")
    assert digest(tmp_path / "models") == before and data.read_text().count("\n") == len(TEXTS)


def test_pickle_only_expert_refused_by_stats_unless_allowed(
    tmp_path: Path, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    expert = pickle_only(zoo["hate"], tmp_path / "pickled")
    data = texts_jsonl(tmp_path)
    calls: list[str] = []
    real = transformers.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForSequenceClassification,
        "from_pretrained",
        lambda *a, **k: calls.append(str(a[0])) or real(*a, **k),
    )
    code, err = run_cli(monkeypatch, capsys, "stats", str(expert), "--data", str(data), "--out", str(tmp_path / "s.st"))
    assert_clean_refusal(code, err, "pytorch_model.bin is a pickle checkpoint")
    assert calls == [] and not (tmp_path / "s.st").exists()
    from typer.testing import CliRunner

    from guardmerge.cli import app

    res = CliRunner().invoke(
        app, ["stats", str(expert), "--data", str(data), "--out", str(tmp_path / "s.st"), "--allow-pickle"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s.st").is_file()


def test_stats_caps_max_length_at_the_model_positions(
    tmp_path: Path, zoo: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from typer.testing import CliRunner

    from guardmerge.cli import app

    data = tmp_path / "long.txt"
    data.write_text(" ".join(["hate"] * 300) + "\nshort text\n")  # 300 tokens; the tiny model has 64 positions
    with caplog.at_level("INFO"):
        res = CliRunner().invoke(
            app,
            [
                "stats",
                str(zoo["hate"]),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "s.safetensors"),
                "--max-length",
                "512",
                "-k",
                "gram",
                "-k",
                "fisher",
            ],
        )
    assert res.exit_code == 0, res.output
    assert "capped at 64" in caplog.text


def test_path_errors_exit_2_with_one_line(
    tmp_path: Path,
    zoo: dict[str, Path],
    merged_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = merge_cfg(tmp_path, zoo)
    plain = tmp_path / "afile.txt"
    plain.write_text("not a folder")
    long = tmp_path / ("x" * 300)
    for args, needle in (
        (["merge", str(cfg), str(long)], "name too long"),
        (["merge", str(cfg), str(tmp_path / ("d" * 300) / "out")], "too long"),
        (["merge", str(long) + ".yaml", str(tmp_path / "o")], "too long"),
        (["merge", str(cfg), str(plain / "out")], "is a file, not a folder"),
        (["export-onnx", str(merged_folder), str(plain / "onnx")], "is a file, not a folder"),
        (
            ["stats", str(zoo["hate"]), "--data", str(texts_jsonl(tmp_path)), "--out", str(plain / "s.safetensors")],
            "is a file, not a folder",
        ),
        (
            ["stats", str(zoo["hate"]), "--data", str(texts_jsonl(tmp_path)), "--out", str(tmp_path), "--force"],
            "contains the input",
        ),
        (
            ["stats", str(zoo["hate"]), "--data", str(texts_jsonl(tmp_path)), "--out", str(merged_folder), "--force"],
            "is a folder",
        ),
    ):
        code, err = run_cli(monkeypatch, capsys, *args)
        assert_clean_refusal(code, err, needle)


def test_cli_subprocess_one_line_error(tmp_path: Path, zoo: dict[str, Path]) -> None:
    bad = copy_expert(zoo["hate"], tmp_path / "bad")
    edit_weights(bad, lambda s: s["classifier.weight"].__setitem__((0, 0), float("inf")))
    cfg = merge_cfg(tmp_path, zoo, experts=[{"model": str(bad), "task": "hate"}])
    proc = subprocess.run(
        [sys.executable, "-m", "guardmerge.cli", "merge", str(cfg), str(tmp_path / "o")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: expert 'hate'") and "Traceback" not in proc.stderr
