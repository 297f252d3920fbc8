"""A local stand-in for the Hugging Face Hub's HTTP API: the part ``huggingface_hub`` uses to
create a repository and a branch, commit files, list them and download them (``create_repo``,
``create_branch``, ``create_commit``/``upload_folder``, ``model_info``, ``list_repo_files``,
``snapshot_download``, ``hf_hub_download``). Standard library only; no network.

- Writes need a token (``Authorization: Bearer ...``): :data:`BAD_TOKEN` gets 401 everywhere (as
  the Hub answers an invalid token), :data:`READ_ONLY_TOKEN` gets 403 on writes.
- ``preupload`` answers ``uploadMode: regular`` for every file, so contents come inline (base64)
  in the commit's NDJSON; an ``lfsFile`` line is refused.
- Each commit gets a fake 40-hex sha; each branch points at one; the files of a branch's head are
  also written under ``root/OWNER/NAME/BRANCH/`` for inspection.
- Downloads answer ``/OWNER/NAME/resolve/REV/PATH`` with ``ETag`` (the git blob sha1, as the Hub
  does for a file in git), ``X-Repo-Commit`` and ``Content-Length``.

Point ``huggingface_hub`` at it with ``HF_ENDPOINT=<url>`` in a new process, or ``endpoint=`` on
``HfApi``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

GOOD_TOKEN = "hf_standin_write"
BAD_TOKEN = "hf_standin_invalid"
READ_ONLY_TOKEN = "hf_standin_read"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of ``data`` (what the Hub reports as a regular file's ETag and oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """A model repository: its visibility, branches (name -> commit sha) and commits (sha -> files)."""

    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)


class HubStandin:
    """The stand-in server, on ``127.0.0.1`` at a free port, while used as a context manager.

    Attributes:
        url: its endpoint (``http://127.0.0.1:PORT``); repos: ``owner/name`` -> :class:`Repo`;
        requests: every ``(method, path)`` served, in order.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._count = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HubStandin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at a branch or commit."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.branches.get(revision, revision)])

    def message(self, repo_id: str, revision: str = "main") -> str:
        """The commit message of a branch's head."""
        repo = self.repos[repo_id]
        return repo.messages[repo.branches.get(revision, revision)]

    # -- state changes (under the lock) -------------------------------------------------------
    def new_sha(self) -> str:
        self._count += 1
        return hashlib.sha1(f"standin-commit-{self._count}".encode()).hexdigest()

    def commit(self, repo_id: str, branch: str, files: dict[str, bytes], message: str) -> str:
        repo = self.repos[repo_id]
        sha = self.new_sha()
        repo.commits[sha] = files
        repo.messages[sha] = message
        repo.branches[branch] = sha
        mirror = self.root / repo_id / branch
        mirror.mkdir(parents=True, exist_ok=True)
        for old in mirror.iterdir():
            old.unlink()
        for name, data in files.items():
            (mirror / name.replace("/", "__")).write_bytes(data)
        return sha


class _Refused(Exception):
    """An HTTP error answer: status, ``X-Error-Code`` and message."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def _handler(hub: HubStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        # -- plumbing ---------------------------------------------------------------------
        def do_GET(self) -> None:
            self._serve("GET")

        def do_HEAD(self) -> None:
            self._serve("HEAD")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            path = urlsplit(self.path).path
            hub.requests.append((method, path))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
            try:
                with hub.lock:
                    self._route(method, [unquote(p) for p in path.strip("/").split("/")], body)
            except _Refused as exc:
                headers = {"X-Error-Message": exc.message}
                if exc.code:
                    headers["X-Error-Code"] = exc.code
                self._send(exc.status, json.dumps({"error": exc.message, **exc.extra}).encode(), headers, method)

        def _send(self, status: int, data: bytes, headers: dict[str, str] | None = None, method: str = "GET") -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if data[:1] in (b"{", b"[") else "text/plain")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

        def _json(self, value: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(value).encode(), headers)

        # -- auth and lookups -------------------------------------------------------------
        def _token(self, write: bool) -> None:
            auth = self.headers.get("Authorization") or ""
            token = auth.removeprefix("Bearer ").strip() or None
            if token == BAD_TOKEN:
                raise _Refused(401, "Invalid credentials in Authorization header")
            if write and token is None:
                raise _Refused(401, "You must be authenticated to access this resource")
            if write and token == READ_ONLY_TOKEN:
                raise _Refused(403, "You don't have the rights to write to this repository")

        def _repo(self, repo_id: str) -> Repo:
            if repo_id not in hub.repos:
                raise _Refused(404, "Repository not found", "RepoNotFound")
            return hub.repos[repo_id]

        def _revision(self, repo: Repo, revision: str) -> str:
            sha = repo.branches.get(revision, revision)
            if sha not in repo.commits:
                raise _Refused(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return sha

        # -- routes ---------------------------------------------------------------------
        def _route(self, method: str, parts: list[str], body: bytes) -> None:
            if parts[:1] == ["api"]:
                self._token(write=method == "POST" and parts[1:2] != ["validate-yaml"])
                return self._api(method, parts[1:], body)
            self._token(write=False)
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            raise _Refused(404, "not found")

        def _api(self, method: str, parts: list[str], body: bytes) -> None:
            if method == "POST" and parts == ["repos", "create"]:
                return self._create(json.loads(body or b"{}"))
            if method == "POST" and parts == ["validate-yaml"]:
                return self._json({"errors": [], "warnings": []})
            if method == "GET" and parts == ["whoami-v2"]:
                return self._json({"type": "user", "name": "standin", "auth": {"accessToken": {"role": "write"}}})
            if len(parts) < 3 or parts[0] != "models":
                raise _Refused(404, "not found")
            repo_id, rest = f"{parts[1]}/{parts[2]}", parts[3:]
            repo = self._repo(repo_id)
            if method == "GET" and not rest:
                return self._info(repo_id, repo, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._info(repo_id, repo, rest[1])
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                self._revision(repo, rest[1])
                files = json.loads(body)["files"]
                return self._json(
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                            for f in files
                        ]
                    }
                )
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_id, repo, rest[1], body)
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                if rest[1] in repo.branches:
                    raise _Refused(409, "Reference already exists")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo.branches[rest[1]] = self._revision(repo, start)
                return self._json({})
            raise _Refused(404, "not found")

        def _create(self, payload: dict[str, Any]) -> None:
            if payload.get("type", "model") != "model":
                raise _Refused(400, "the stand-in serves model repositories only")
            repo_id = f"{payload.get('organization') or 'standin'}/{payload['name']}"
            if repo_id in hub.repos:
                raise _Refused(409, "You already created this model repo", url=f"{hub.url}/{repo_id}")
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            hub.commit(repo_id, "main", {".gitattributes": GITATTRIBUTES}, "initial commit")
            self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _info(self, repo_id: str, repo: Repo, revision: str) -> None:
            sha = self._revision(repo, revision)
            files = repo.commits[sha]
            self._json(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": repo.private,
                    "siblings": [{"rfilename": name} for name in sorted(files)],
                }
            )

        def _tree(self, repo: Repo, revision: str) -> None:
            files = repo.commits[self._revision(repo, revision)]
            self._json(
                [
                    {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
                    for name, data in sorted(files.items())
                ]
            )

        def _commit(self, repo_id: str, repo: Repo, branch: str, body: bytes) -> None:
            if branch not in repo.branches:
                raise _Refused(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            files = dict(repo.commits[repo.branches[branch]])
            message = ""
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value["summary"]
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _Refused(404, f"File not found: {value['path']}", "EntryNotFound")
                    del files[value["path"]]
                else:
                    raise _Refused(400, f"the stand-in does not take '{key}' commit lines")
            sha = hub.commit(repo_id, branch, files, message)
            self._json({"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        def _resolve(self, method: str, repo_id: str, revision: str, name: str) -> None:
            repo = self._repo(repo_id)
            sha = self._revision(repo, revision)
            if name not in repo.commits[sha]:
                raise _Refused(404, "Entry not found", "EntryNotFound")
            data = repo.commits[sha][name]
            headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
            self._send(200, data, headers, method)

    return Handler
