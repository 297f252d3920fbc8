"""The Hugging Face Hub round trip: ``guardmerge push`` / :func:`push_to_hub`, then
``guardmerge.load("owner/name")``, against a local stand-in for the Hub's API (no network)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import guardmerge
from guardmerge.cli import app, main
from guardmerge.errors import CheckpointError, DataError, HubError
from guardmerge.io.hub import check_repo_id, hub_card, push_to_hub
from tests.builders import TEXTS, zoo_merge_config
from tests.io.hub_standin import BAD_TOKEN, GOOD_TOKEN, READ_ONLY_TOKEN, HubStandin

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def folder(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-head merged folder (hate, injection, sentiment) written by the command line's
    write path: weights, config, tokenizer, merge_config.yaml and the model card."""
    from guardmerge.merge.job import MergeJob
    from guardmerge.merge.stages import merge_to_folder

    out = tmp_path_factory.mktemp("hub-merged") / "merged"
    merge_to_folder(MergeJob.of(zoo_merge_config(zoo)), out, progress=False)
    return out


@pytest.fixture(scope="module")
def folder_logits(folder: Path) -> dict[str, torch.Tensor]:
    return guardmerge.load(folder).logits(TEXTS)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandin]:
    """The stand-in, with ``huggingface_hub`` of this process pointed at it (every request:
    ``endpoint=`` only covers the push's own) and an empty cache."""
    from huggingface_hub import constants

    with HubStandin(tmp_path / "hub") as standin:
        monkeypatch.setattr(constants, "ENDPOINT", standin.url)
        template = standin.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield standin


def copy_of(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def fidelity_report(path: Path, heads: tuple[str, ...] = ("hate", "injection")) -> Path:
    """A report in the shape ``guardmerge eval MERGED --experts --out`` writes."""
    stats = {"n": 4, "agreement": 0.75, "agreement_low": 0.5, "agreement_high": 1.0}
    stats |= {"flag_rate_diff": 0.0, "flag_rate_diff_low": -0.25, "flag_rate_diff_high": 0.25}
    path.write_text(json.dumps(dict.fromkeys(heads, stats), indent=2) + "\n")
    return path


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The console entry point in-process; its exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["guardmerge", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code or 0), capsys.readouterr().err


def assert_clean_refusal(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# -- the round trip ---------------------------------------------------------------------------------


def test_push_then_load_from_the_hub_gives_the_folders_logits(
    folder: Path, folder_logits: dict[str, torch.Tensor], hub: HubStandin, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="guardmerge"):
        url = push_to_hub(folder, "org/guard", token=GOOD_TOKEN, endpoint=hub.url, progress=False)
    assert url.startswith(f"{hub.url}/org/guard/commit/")
    assert "no fidelity report" in caplog.text
    files = hub.files("org/guard")
    local = {p.name for p in folder.iterdir()}
    assert set(files) == local | {".gitattributes"} and "fidelity.json" not in files
    assert {"README.md", "merge_config.yaml", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert files["merge_config.yaml"] == (folder / "merge_config.yaml").read_bytes()
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "guardmerge.load('org/guard')" in card and "THIS_FOLDER" not in card
    assert "library_name: guardmerge" in card and "base_model:" not in card.split("\n---\n", 1)[0]  # a local path
    assert hub.message("org/guard") == "Push guardmerge model (3 heads: hate, injection, sentiment)"

    loaded = guardmerge.load("org/guard")
    assert loaded.tasks == ["hate", "injection", "sentiment"]
    got = loaded.logits(TEXTS)
    assert all(torch.equal(got[t], folder_logits[t]) for t in folder_logits)


def test_cli_push_to_a_private_branch_with_a_fidelity_report(
    folder: Path, folder_logits: dict[str, torch.Tensor], hub: HubStandin, tmp_path: Path
) -> None:
    report = fidelity_report(tmp_path / "fidelity.json")
    args = ["push", str(folder), "org/guard", "--fidelity", str(report), "--private", "--branch", "v1"]
    res = runner.invoke(
        app, [*args, "-m", "first merge", "--endpoint", hub.url, "--no-progress"], env={"HF_TOKEN": GOOD_TOKEN}
    )
    assert res.exit_code == 0, res.output
    assert "pushed" in res.output and "org/guard (branch v1)" in res.output and "/org/guard/commit/" in res.output
    assert hub.repos["org/guard"].private
    assert set(hub.files("org/guard", "main")) == {".gitattributes"}
    files = hub.files("org/guard", "v1")
    assert files["fidelity.json"] == report.read_bytes() and hub.message("org/guard", "v1") == "first merge"
    card = files["README.md"].decode()
    assert "## Fidelity to the experts" in card and "0.750 [0.500, 1.000]" in card and "injection" in card
    loaded = guardmerge.load("org/guard", revision="v1")
    assert torch.equal(loaded.logits(TEXTS)["hate"], folder_logits["hate"])


def test_a_second_push_replaces_the_model_and_keeps_other_files(
    folder: Path, hub: HubStandin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = copy_of(folder, tmp_path / "first")
    fidelity_report(first / "fidelity.json")  # picked up from the folder
    (first / "notes.json").write_text("{}")
    (first / "LICENSE").write_text("Apache-2.0")
    push_to_hub(first, "org/guard", token=GOOD_TOKEN, endpoint=hub.url, progress=False)
    assert {"fidelity.json", "notes.json", "LICENSE"} <= set(hub.files("org/guard"))
    with caplog.at_level("INFO", logger="guardmerge"):
        push_to_hub(folder, "org/guard", token=GOOD_TOKEN, endpoint=hub.url, progress=False)
    files = hub.files("org/guard")
    assert "fidelity.json" not in files and "notes.json" not in files and "deleted 2 stale" in caplog.text
    assert {"LICENSE", ".gitattributes", "model.safetensors", "README.md"} <= set(files)


def test_hidden_temporary_and_nested_files_are_never_pushed(folder: Path, hub: HubStandin, tmp_path: Path) -> None:
    own = copy_of(folder, tmp_path / "m")
    (own / ".env").write_text("HF_TOKEN=secret")
    (own / ".model.safetensors.tmp-1234").write_bytes(b"partial")
    (own / "config.json~").write_text("{}")
    (own / "upload.part").write_text("x")
    (own / "runs").mkdir()
    (own / "runs" / "log.json").write_text("{}")
    push_to_hub(own, "org/guard", token=GOOD_TOKEN, endpoint=hub.url, progress=False)
    pushed = set(hub.files("org/guard"))
    assert pushed == {p.name for p in folder.iterdir()} | {".gitattributes"}


# -- refusals: one line, exit code 2, nothing committed ------------------------------------------------


@pytest.mark.parametrize("repo_id", ["guard", "org/guard/extra", "./guard", "org/-guard", "org/a--b", "org/guard.git"])
def test_an_invalid_repo_id_is_refused_before_any_request(
    folder: Path,
    hub: HubStandin,
    repo_id: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = run_cli(monkeypatch, capsys, "push", str(folder), repo_id, "--endpoint", hub.url, "--token", "x")
    assert_clean_refusal(code, err, f"repository id '{repo_id}' is not OWNER/NAME")
    assert hub.requests == []


def test_check_repo_id_accepts_hub_ids() -> None:
    for ok in ("org/guard", "my-org/guard_model.v2", "a/b", "Org123/X"):
        assert check_repo_id(ok) == ok
    with pytest.raises(HubError):
        check_repo_id("org/" + "x" * 97)


@pytest.mark.parametrize(
    "which, needle",
    [
        ("expert", "no 'guardmerge.heads' section"),  # a stock classifier, not a merged model
        ("no-card", "README.md is missing"),
        ("no-merge-config", "merge_config.yaml is missing"),
        ("missing", "is not a local folder"),
        ("bad-merge-config", "merge_config.yaml is not valid YAML"),
        ("binary-card", "README.md is not UTF-8 text"),
    ],
)
def test_a_folder_that_is_not_a_merged_model_is_refused(
    folder: Path,
    zoo: dict[str, Path],
    hub: HubStandin,
    tmp_path: Path,
    which: str,
    needle: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if which == "expert":
        src = copy_of(zoo["hate"], tmp_path / "expert")
        (src / "README.md").write_text("card")
        (src / "merge_config.yaml").write_text("method: ties\n")
    elif which == "missing":
        src = tmp_path / "nowhere"
    elif which == "bad-merge-config":
        src = copy_of(folder, tmp_path / which)
        (src / "merge_config.yaml").write_text("method: [ties\n")
    elif which == "binary-card":
        src = copy_of(folder, tmp_path / which)
        (src / "README.md").write_bytes(b"\xff\xfe card")
    else:
        src = copy_of(folder, tmp_path / which)
        (src / ("README.md" if which == "no-card" else "merge_config.yaml")).unlink()
    code, err = run_cli(monkeypatch, capsys, "push", str(src), "org/guard", "--endpoint", hub.url, "--token", "x")
    assert_clean_refusal(code, err, needle)
    assert hub.repos == {}


@pytest.mark.parametrize(
    "token, needle",
    [
        (BAD_TOKEN, "refused the token for repository 'org/guard' (401 Unauthorized)"),
        (READ_ONLY_TOKEN, "the token may not write to repository 'org/guard'"),
        ("", "needs a token to write to repository 'org/guard' (401 Unauthorized)"),
    ],
)
def test_a_refused_token_is_one_line_naming_the_repository(
    folder: Path,
    hub: HubStandin,
    tmp_path: Path,
    token: str,
    needle: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    code, err = run_cli(monkeypatch, capsys, "push", str(folder), "org/guard", "--endpoint", hub.url)
    assert_clean_refusal(code, err, needle, "hf auth login")
    assert hub.repos == {} and (not token or token not in err)


def test_an_unreachable_hub_offline_mode_and_a_bad_branch_are_one_line(
    folder: Path, hub: HubStandin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(
        monkeypatch, capsys, "push", str(folder), "org/guard", "--endpoint", "http://127.0.0.1:9", "--token", "x"
    )
    assert_clean_refusal(code, err, "cannot reach the Hugging Face Hub at http://127.0.0.1:9", "'org/guard'")
    code, err = run_cli(
        monkeypatch, capsys, "push", str(folder), "org/guard", "--branch", "my branch", "--endpoint", hub.url
    )
    assert_clean_refusal(code, err, "branch 'my branch' is not a valid git branch name")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="cannot reach the Hugging Face Hub .* offline mode is enabled"):
        push_to_hub(folder, "org/guard", token=GOOD_TOKEN, endpoint=hub.url, progress=False)
    assert hub.repos == {}


def test_private_is_refused_for_an_existing_public_repository(folder: Path, hub: HubStandin) -> None:
    push_to_hub(folder, "org/guard", token=GOOD_TOKEN, endpoint=hub.url, progress=False)
    before = hub.files("org/guard")
    with pytest.raises(HubError, match="'org/guard' exists and is public"):
        push_to_hub(folder, "org/guard", private=True, token=GOOD_TOKEN, endpoint=hub.url, progress=False)
    assert hub.files("org/guard") == before


@pytest.mark.parametrize(
    "content, needle",
    [
        ({"hate": {"macro_f1": 0.8, "accuracy": 0.9}}, "head 'hate' has neither 'agreement' nor 'off_task_agreement'"),
        ({"toxicity": {"agreement": 0.9}}, "head 'toxicity' is not a head of this model"),
        ({"hate": {"agreement": "high"}}, "'agreement' is not a finite number"),
        (
            {"hate": {"agreement": 0.9, "agreement_low": 0.8, "agreement_high": 1.0, "off_task_agreement": 0.8}},
            "'off_task_agreement' without its interval",
        ),
        ([1, 2], "is not a fidelity report"),
        (None, "not found"),
    ],
)
def test_a_bad_fidelity_report_is_refused(
    folder: Path, hub: HubStandin, tmp_path: Path, content: object, needle: str
) -> None:
    report = tmp_path / "report.json"
    if content is not None:
        report.write_text(json.dumps(content))
    with pytest.raises(DataError, match="report.json") as info:
        push_to_hub(folder, "org/guard", fidelity=report, token=GOOD_TOKEN, endpoint=hub.url, progress=False)
    assert needle in str(info.value) and hub.repos == {}


def test_a_link_out_of_the_folder_is_refused(folder: Path, hub: HubStandin, tmp_path: Path) -> None:
    own = copy_of(folder, tmp_path / "m")
    (tmp_path / "secret.txt").write_text("secret")
    (own / "notes.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(CheckpointError, match="resolves outside the model folder"):
        push_to_hub(own, "org/guard", token=GOOD_TOKEN, endpoint=hub.url, progress=False)
    assert hub.repos == {}


def test_loading_a_missing_hub_repository_is_one_clean_error(hub: HubStandin) -> None:
    with pytest.raises(CheckpointError, match="'org/missing' is not a local folder and could not be fetched"):
        guardmerge.load("org/missing")


def test_the_hub_card_names_the_repository_and_keeps_hub_base_models() -> None:
    card = "---\nlibrary_name: guardmerge\nbase_model: org/base\ntags: [x]\n---\n\nguardmerge.load('THIS_FOLDER')\n"
    out = hub_card(card, "me/guard")
    assert "base_model: org/base" in out and "guardmerge.load('me/guard')" in out
    assert "base_model" not in hub_card(card.replace("org/base", "/tmp/x/base"), "me/guard")
    assert "base_model" not in hub_card(card.replace("org/base", "./experts/base"), "me/guard")


# -- the README's example, run as a user runs it ------------------------------------------------


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def test_the_readme_example_runs_against_the_standin(
    folder: Path, folder_logits: dict[str, torch.Tensor], hub: HubStandin, tmp_path: Path
) -> None:
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- hub-example:start -->", "<!-- hub-example:end -->"
    if start not in readme or end not in readme:
        pytest.skip("README.md has no hub example markers")
    block = _between(readme, start, end)
    commands = _between(block, "```bash\n", "```").replace("\\\n", " ")
    code = _between(block, "```python\n", "```")
    work = tmp_path / "work"
    work.mkdir()
    copy_of(folder, work / "merged")
    (work / "prompts.txt").write_text("\n".join(TEXTS) + "\n")
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_TOKEN": GOOD_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
    }
    ran = 0
    for line in commands.splitlines():
        args = shlex.split(line, comments=True)
        if not args or args[0] == "export":  # the token is HF_TOKEN above
            continue
        assert args[0] == "guardmerge", line
        proc = subprocess.run(
            [sys.executable, "-m", "guardmerge.cli", *args[1:]], cwd=work, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
        ran += 1
    assert ran >= 1 and hub.repos, "the example pushes nothing"
    (repo_id,) = hub.repos
    files = hub.files(repo_id)
    assert {"README.md", "merge_config.yaml", "model.safetensors"} <= set(files)
    if "--fidelity" in commands:
        assert "fidelity.json" in files and "## Fidelity to the experts" in files["README.md"].decode()

    check = f"\nimport json\nprint(json.dumps({{t: v.tolist() for t, v in model.logits({TEXTS!r}).items()}}))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code + check], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {t: v.tolist() for t, v in folder_logits.items()}
