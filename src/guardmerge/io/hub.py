"""Publishing a merged model folder on the Hugging Face Hub (``guardmerge push``).

:func:`push_to_hub` checks the folder first (it loads as a merged multi-head model, and holds its
model card ``README.md`` and ``merge_config.yaml``), then writes it into one commit of the
repository, created when missing:

- the folder's files, top level only; hidden and temporary files (``.*``, ``*~``, ``*.tmp``...)
  and sub-folders are left out, and a link that resolves outside the folder is refused;
- the model card, adapted for the Hub: its usage lines name the repository instead of
  ``THIS_FOLDER``, a ``base_model`` that is a local path is dropped from its metadata (the Hub
  accepts only repository ids there), and it gains a fidelity section when a report is pushed;
- the fidelity report of ``guardmerge eval MERGED --experts --out FILE`` as ``fidelity.json``
  (``fidelity=FILE``, or the folder's own ``fidelity.json``), checked against the model's heads;
- files of an earlier push that ``guardmerge.load`` would read (weights, JSON, tokenizer files:
  :data:`~guardmerge.io.checkpoint.HUB_PATTERNS`) and that this folder lacks are deleted in the
  same commit, so the repository loads as exactly this model; other files (``.gitattributes``,
  a licence) are kept.

Every failure is one :class:`~guardmerge.errors.GuardmergeError` naming the folder, file or
repository: a bad repository id or branch, a refused token (401/403), a missing repository or
branch, an unreachable Hub. ``guardmerge.load("owner/name")`` reads the repository back
(:func:`~guardmerge.io.checkpoint.resolve`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from guardmerge.errors import CheckpointError, DataError, GuardmergeError, HubError
from guardmerge.io.formats import MERGE_CONFIG_FILE, MODEL_CARD_FILE, check_inside, clip, read_json, short_path

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import CommitOperationAdd, CommitOperationDelete

log = logging.getLogger(__name__)

FIDELITY_FILE = "fidelity.json"
"""The fidelity report's name in a pushed repository (and in a folder, where it is picked up)."""

_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_TEMPORARY_SUFFIXES = ("~", ".tmp", ".temp", ".part", ".partial", ".lock", ".swp", ".incomplete")
_INTERVAL_STATISTICS = ("agreement", "flag_rate_diff", "off_task_agreement", "off_task_flag_rate_diff")


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` when it is a Hub model id ``OWNER/NAME``.

    Raises:
        HubError: anything else (a path, one part only, characters the Hub refuses).
    """
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    valid = len(parts) == 2 and all(_NAME.fullmatch(p) and "--" not in p and ".." not in p for p in parts)
    if not valid or repo_id.endswith(".git"):
        raise HubError(
            f"repository id '{clip(repo_id)}' is not OWNER/NAME (letters, digits, '-', '_' and '.', "
            "at most 96 characters each, not starting or ending with '-' or '.', no '--' or '..'), "
            "e.g. my-org/guard-model"
        )
    return repo_id


def check_branch(branch: str) -> str:
    """``branch`` when git accepts it as a branch name.

    Raises:
        HubError: an empty name, or one with spaces, control characters, ``..``, ``~^:?*[\\``.
    """
    bad = (
        not branch
        or branch.startswith(("-", "/", "."))
        or branch.endswith(("/", ".", ".lock"))
        or ".." in branch
        or "//" in branch
        or "@{" in branch
        or any(c in branch for c in " ~^:?*[\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in branch)
    )
    if bad:
        raise HubError(f"branch '{clip(branch)}' is not a valid git branch name")
    return branch


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    fidelity: str | Path | None = None,
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    progress: bool = True,
) -> str:
    """Push the merged model ``folder`` to the Hub repository ``repo_id`` in one commit.

    Args:
        folder: a merged model folder (written by ``guardmerge merge``).
        repo_id: ``OWNER/NAME``; the model repository is created when missing.
        fidelity: a fidelity report (``guardmerge eval MERGED --experts --out FILE``), pushed as
            ``fidelity.json``; default: the folder's own ``fidelity.json``, if any.
        private: create the repository private (refused for an existing public one); None: the
            Hub's default for the owner.
        token: a Hub token with write access; None: ``$HF_TOKEN`` or the saved login.
        branch: the branch to commit to (created from ``main`` when missing); None: ``main``.
        commit_message: default: one naming the heads.
        endpoint: the Hub's URL; None: ``$HF_ENDPOINT`` or https://huggingface.co.
        progress: show a progress bar while the files are hashed.

    Returns:
        The URL of the commit.

    Raises:
        HubError: a bad repository id or branch, a refused token, an unreachable Hub.
        CheckpointError: the folder is not a loadable merged model, or lacks its model card
            or ``merge_config.yaml``.
        DataError: the fidelity report is not one, or names heads the model lacks.
    """
    check_repo_id(repo_id)
    if branch is not None:
        check_branch(branch)
    root = Path(folder).expanduser()
    heads = check_merged_folder(root)
    files = folder_files(root)
    report_file = Path(fidelity).expanduser() if fidelity is not None else files.get(FIDELITY_FILE)
    report = read_fidelity(report_file, heads) if report_file is not None else None
    if report is None:
        log.info(
            "no fidelity report: %s has no %s and none was given: pushing without one (write one with "
            "`guardmerge eval MERGED --experts --out FILE`, push it with --fidelity FILE)",
            short_path(root),
            FIDELITY_FILE,
        )
    else:
        log.info("publishing the fidelity report %s as %s", short_path(report_file or ""), FIDELITY_FILE)
    if Path(repo_id).is_dir():
        log.warning("a local folder '%s' exists: guardmerge.load('%s') reads it, not the Hub", repo_id, repo_id)
    card = hub_card(_read_text(files[MODEL_CARD_FILE]), repo_id, report)
    message = commit_message or f"Push guardmerge model ({len(heads)} heads: {', '.join(heads)})"
    given = {MODEL_CARD_FILE: card.encode("utf-8")}
    if fidelity is not None and report_file is not None:
        given[FIDELITY_FILE] = json.dumps(report, indent=2).encode("utf-8") + b"\n"
    additions = _additions(files, given, progress)  # hashed before anything is created
    with _hub_errors(repo_id, endpoint, branch, anonymous=token is None):
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private:
            _refuse_public(api, repo_id)
        if branch is not None and branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        deletions = _stale(api, repo_id, branch, {a.path_in_repo for a in additions})
        info = api.create_commit(repo_id, [*deletions, *additions], commit_message=message, revision=branch)
    url = str(info.commit_url)
    log.info(
        "pushed %d files%s to %s (%s)",
        len(additions),
        f" and deleted {len(deletions)} stale ones" if deletions else "",
        repo_id,
        url,
    )
    return url


def check_merged_folder(folder: Path) -> list[str]:
    """The heads of the merged model in ``folder``, after loading it as ``guardmerge.load`` does
    and checking that it holds its model card and ``merge_config.yaml``.

    Raises:
        CheckpointError: not a local folder, not a loadable merged model, no card or merge config.
    """
    import yaml

    from guardmerge.models.multihead import MultiHeadModel

    if not folder.is_dir():
        raise CheckpointError(
            f"'{short_path(folder)}' is not a local folder: push a merged model folder written by `guardmerge merge`"
        )
    for name, what in ((MODEL_CARD_FILE, "model card"), (MERGE_CONFIG_FILE, "merge config")):
        if not (folder / name).is_file():
            raise CheckpointError(
                f"{short_path(folder / name)} is missing: a pushed model needs its {what}; push a folder "
                "written by `guardmerge merge`"
            )
    try:
        merge_config = yaml.safe_load(_read_text(folder / MERGE_CONFIG_FILE))
    except (RecursionError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{short_path(folder / MERGE_CONFIG_FILE)} is not valid YAML: {clip(exc, 200)}") from None
    if not isinstance(merge_config, dict):
        raise CheckpointError(f"{short_path(folder / MERGE_CONFIG_FILE)} is not a merge config (not a mapping)")
    log.info("checking that %s loads as a merged model", short_path(folder))
    model = MultiHeadModel.from_pretrained(folder)  # every rule of the checked reader
    if model.tokenizer is None:
        log.warning("%s has no tokenizer: the pushed model will need one to predict", short_path(folder))
    return list(model.tasks)


def _read_text(path: Path) -> str:
    """``path`` as UTF-8 text, or a :class:`CheckpointError` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"{short_path(path)}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{short_path(path)} is not UTF-8 text (bad byte at offset {exc.start})") from None


def folder_files(folder: Path) -> dict[str, Path]:
    """Name -> path of the files of ``folder`` a push uploads: regular files at the top level,
    neither hidden nor temporary (those and sub-folders are logged and left out).

    Raises:
        CheckpointError: a link that resolves outside the folder.
    """
    files: dict[str, Path] = {}
    skipped = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or name.endswith(_TEMPORARY_SUFFIXES) or ".tmp-" in name:
            skipped.append(name)
            continue
        if path.is_symlink():
            check_inside(folder, path, "file")
        if not path.is_file():
            skipped.append(name + ("/" if path.is_dir() else ""))
            continue
        files[name] = path
    if skipped:
        log.info("not pushed (hidden, temporary or not a file): %s", ", ".join(clip(s, 60) for s in skipped))
    return files


def read_fidelity(path: Path, heads: list[str]) -> dict[str, dict[str, float]]:
    """The fidelity report at ``path`` (``{head: {statistic: number}}``, as ``guardmerge eval
    MERGED --experts --out`` writes it), checked against the model's ``heads``.

    Raises:
        DataError: not a JSON object of that shape, a head the model lacks, a head without
            ``agreement`` or ``off_task_agreement``.
    """
    where = short_path(path)
    hint = "write one with `guardmerge eval MERGED --experts --out FILE`"
    if not path.is_file():
        raise DataError(f"fidelity report {where} not found ({hint})")
    data = read_json(path, error=DataError, what="fidelity report", max_bytes=16 << 20)
    if not isinstance(data, dict) or not data:
        raise DataError(f"{where} is not a fidelity report: expected {{head: {{statistic: value}}}} ({hint})")
    unknown = [h for h in data if h not in heads]
    if unknown:
        raise DataError(
            f"{where}: head '{clip(unknown[0])}' is not a head of this model ({', '.join(heads)}): "
            "a report of another model?"
        )
    for head, stats in data.items():
        if not isinstance(stats, dict) or not {"agreement", "off_task_agreement"} & set(stats):
            raise DataError(
                f"{where}: head '{head}' has neither 'agreement' nor 'off_task_agreement': "
                f"not a fidelity report ({hint})"
            )
        for name, value in stats.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(f"{where}: head '{head}', '{clip(name)}' is not a finite number")
        for name in _INTERVAL_STATISTICS:
            if name in stats and not {f"{name}_low", f"{name}_high"} <= set(stats):
                raise DataError(
                    f"{where}: head '{head}' has '{name}' without its interval ('{name}_low', '{name}_high')"
                )
    return data


def hub_card(card: str, repo_id: str, fidelity: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """The model card as pushed to ``repo_id``: usage lines naming the repository, no local
    ``base_model`` in the metadata, and the fidelity report's table when there is one."""
    text = card.replace("THIS_FOLDER", repo_id)
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        meta, body = text[4:].split("\n---\n", 1)
        kept = []
        for line in meta.split("\n"):
            if line.startswith("base_model:") and not _is_hub_id(line.split(":", 1)[1].strip().strip("'\"")):
                continue
            kept.append(line)
        text = "---\n" + "\n".join(kept) + "\n---\n" + body
    if fidelity:
        from guardmerge.evaluate.fidelity import fidelity_table

        text = (
            text.rstrip("\n")
            + "\n\n## Fidelity to the experts\n\n"
            + f"From `{FIDELITY_FILE}` (`guardmerge eval MERGED --experts`): per head, how often the merged head "
            + "gives its expert's verdict on unlabelled texts, on its own task's texts and on the others' "
            + "(off-task), and the flag-rate difference (merged minus expert).\n\n"
            + "```text\n"
            + fidelity_table(fidelity)
            + "\n```\n"
        )
    return text


def _is_hub_id(value: str) -> bool:
    """Whether a card's ``base_model`` value can be a Hub model id (not a local path)."""
    parts = value.split("/")
    if not 1 <= len(parts) <= 2 or not all(_NAME.fullmatch(p) for p in parts):
        return False
    try:
        return not Path(value).exists()
    except OSError:
        return True


def _additions(files: Mapping[str, Path], given: Mapping[str, bytes], progress: bool) -> list[CommitOperationAdd]:
    """The commit's uploads: the ``given`` contents (the adapted card, a given fidelity report),
    then the folder's other files, hashed now (with a progress bar).

    Raises:
        CheckpointError: a file that cannot be read.
    """
    from huggingface_hub import CommitOperationAdd
    from tqdm.auto import tqdm

    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=bytes(data)) for name, data in given.items()]
    todo = [(name, path) for name, path in files.items() if name not in given]
    for name, path in tqdm(todo, desc="hashing", unit="file", disable=not progress or len(todo) < 2):
        try:
            ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
        except OSError as exc:
            raise CheckpointError(f"{short_path(path)}: cannot read: {exc.strerror or exc}") from None
    return ops


def _stale(api: HfApi, repo_id: str, branch: str | None, pushed: set[str]) -> list[CommitOperationDelete]:
    """Deletions of the files on the branch that ``guardmerge.load`` would read and this push
    does not replace (an earlier push's shards, tokenizer or fidelity report)."""
    from huggingface_hub import CommitOperationDelete
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from guardmerge.io.checkpoint import HUB_PATTERNS

    try:
        remote = api.list_repo_files(repo_id, revision=branch)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return []
    stale = [
        f
        for f in remote
        if "/" not in f and f not in pushed and any(fnmatch.fnmatch(f, p) for p in [*HUB_PATTERNS, FIDELITY_FILE])
    ]
    if stale:
        log.info("deleting files of an earlier push from %s: %s", repo_id, ", ".join(stale))
    return [CommitOperationDelete(path_in_repo=f) for f in stale]


def _refuse_public(api: HfApi, repo_id: str) -> None:
    """Refuse to push a model meant to be private into an existing public repository."""
    if api.model_info(repo_id).private is False:
        raise HubError(
            f"repository '{repo_id}' exists and is public: --private only makes a new repository private "
            "(make it private on the Hub first, or push without --private)"
        )


@contextmanager
def _hub_errors(repo_id: str, endpoint: str | None, branch: str | None, *, anonymous: bool) -> Iterator[None]:
    """Turn what ``huggingface_hub`` raises into one :class:`HubError` naming the repository."""
    try:
        yield
    except GuardmergeError:
        raise
    except Exception as exc:
        raise hub_error(exc, repo_id, endpoint, branch, anonymous=anonymous) from None


def hub_error(
    exc: Exception, repo_id: str, endpoint: str | None = None, branch: str | None = None, *, anonymous: bool = False
) -> GuardmergeError:
    """One line for an error of ``huggingface_hub`` while writing ``repo_id`` (``anonymous``: no
    token was passed, so a 401 may mean that none was found either)."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    hub = (endpoint or constants.ENDPOINT).rstrip("/")
    login = "log in with `hf auth login`, or pass --token (or set HF_TOKEN) with a token that may write to it"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"branch '{branch or 'main'}' of repository '{repo_id}' not found on {hub}")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"repository '{repo_id}' not found on {hub}, or the token cannot see it: {login}")
    if isinstance(exc, HfHubHTTPError) and status == 401 and anonymous and get_token() is None:
        return HubError(f"{hub} needs a token to write to repository '{repo_id}' (401 Unauthorized): {login}")
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return HubError(f"{hub} refused the token for repository '{repo_id}' (401 Unauthorized): {login}")
    if isinstance(exc, HfHubHTTPError) and status == 403:
        return HubError(f"the token may not write to repository '{repo_id}' on {hub} (403 Forbidden): {login}")
    if isinstance(exc, HfHubHTTPError):
        server = getattr(exc, "server_message", None) or str(exc)
        return HubError(f"{hub} answered {status} for repository '{repo_id}': {_first_line(server)}")
    if _is_network_error(exc):
        return HubError(f"cannot reach the Hugging Face Hub at {hub} to push '{repo_id}': {_first_line(exc)}")
    if isinstance(exc, ValueError):  # huggingface_hub's refusals before any request (card metadata...)
        return HubError(f"pushing to repository '{repo_id}' refused: {_first_line(exc)}")
    return HubError(f"pushing to repository '{repo_id}' on {hub} failed: {type(exc).__name__}: {_first_line(exc)}")


def _is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection or timeout error (of httpx, httpx2, requests or the OS)."""
    names = {c.__name__ for c in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(
        names & {"TransportError", "NetworkError", "TimeoutException", "ConnectError", "ConnectionError"}
    )


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return clip(" ".join(lines[:2]) if lines else type(exc).__name__, 240)


__all__ = ["FIDELITY_FILE", "check_branch", "check_merged_folder", "check_repo_id", "hub_card", "push_to_hub"]
