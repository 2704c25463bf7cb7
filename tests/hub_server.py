"""A small Hugging Face Hub-compatible HTTP server for tests, on a loopback port.

Why not olah: in offline mode it has no tokens or gated repos and ignores `Range` (no resume),
which are three of the things the fetch tests must cover (see ../shared/reference/hub-testing.md).
This server implements what huggingface_hub 2.x asks of the hub for the calls edgeagent makes,
with the hub's own status codes and `X-Error-Code` headers, so huggingface_hub raises its real
errors:

    GET  /api/models/{org}/{name}[/revision/{rev}]          model info (id, sha, siblings, gated)
    GET  /api/models/{org}/{name}/tree/{rev}[/{path}]        files: sizes, blob ids, LFS sha256
    HEAD /{org}/{name}/resolve/{rev}/{path}                  X-Repo-Commit, ETag, Content-Length
    GET  /{org}/{name}/resolve/{rev}/{path}                  bytes; honours `Range: bytes=N-`

Repos live in memory as commits of files on disk; `corrupt`, `bytes_per_s` and `requests` are
the knobs and the record the tests need. `hostile` turns it into a hub that lies and misbehaves
(`Hostile`): a commit id of another form or another commit, extra entries in the file listing,
bodies longer or shorter than listed, endless or stalling, a redirect loop, error answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
Body = Literal["longer", "shorter", "endless", "stall"]


@dataclass
class Hostile:
    """How the hub misbehaves. `answers` are consumed one per request, in order, before any
    request is served normally: (status, headers)."""

    sha: str | None = None  # the commit model_info names
    extra_tree: list[dict[str, Any]] = field(default_factory=list)  # added to every listing
    bodies: dict[str, Body] = field(default_factory=dict)  # by path
    redirect_loop: bool = False  # every download answers 302 to itself
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)


@dataclass(frozen=True)
class HubFile:
    source: Path
    size: int
    sha256: str
    git_sha1: str

    @property
    def lfs(self) -> bool:
        return self.source.name.endswith(LFS_SUFFIXES)

    @classmethod
    def of(cls, path: Path) -> HubFile:
        data = path.read_bytes()
        git = hashlib.sha1(f"blob {len(data)}\0".encode() + data, usedforsecurity=False)
        return cls(path, len(data), hashlib.sha256(data).hexdigest(), git.hexdigest())


@dataclass
class HubRepo:
    repo_id: str
    gated: bool = False
    private: bool = False
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, model_dir: Path, branch: str = "main") -> str:
        """Publish every file under model_dir as a new commit on branch; returns its sha."""
        files = {
            p.relative_to(model_dir).as_posix(): HubFile.of(p)
            for p in sorted(model_dir.rglob("*"))
            if p.is_file()
        }
        parent = self.refs.get(branch, "")
        digest = hashlib.sha1(parent.encode(), usedforsecurity=False)
        for name, file in files.items():
            digest.update(f"{name}\0{file.git_sha1}\n".encode())
        sha = digest.hexdigest()
        self.commits[sha] = files
        self.refs[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        matches = [sha for sha in self.commits if sha.startswith(revision)]
        return matches[0] if len(matches) == 1 and len(revision) >= 7 else None


class HubServer:
    def __init__(self, tokens: set[str] | None = None, port: int = 0) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.tokens = tokens or set()
        self.corrupt: set[tuple[str, str]] = set()  # (repo, path) served with one byte flipped
        self.bytes_per_s: float | None = None
        self.hostile = Hostile()
        self.stalled = threading.Event()  # set to let stalled bodies end
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self._http = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def add_repo(self, repo_id: str, **options: bool) -> HubRepo:
        repo = self.repos[repo_id] = HubRepo(repo_id, **options)
        return repo

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stalled.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._dispatch(send_body=True)

        def do_HEAD(self) -> None:
            self._dispatch(send_body=False)

        def _dispatch(self, send_body: bool) -> None:
            path = urlsplit(self.path).path
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if hub.hostile.answers:
                self._send_answer(*hub.hostile.answers.pop(0))
                return
            try:
                if path.startswith("/api/models/"):
                    self._send_json(self._api(path.removeprefix("/api/models/")), send_body)
                elif "/resolve/" in path:
                    self._resolve(path, send_body)
                else:
                    raise HubError(404, "NotFound", f"no route for {path}")
            except HubError as error:
                self._send_error(error, send_body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away (a killed fetch): nothing to answer

        def _api(self, rest: str) -> Any:
            parts = rest.split("/")
            repo = self._repo("/".join(parts[:2]), need_files=False)
            if len(parts) == 2:
                return _info(repo, repo.refs["main"])
            if parts[2] == "revision" and len(parts) == 4:
                info = _info(repo, self._commit(repo, unquote(parts[3])))
                return {**info, "sha": hub.hostile.sha} if hub.hostile.sha else info
            if parts[2] == "tree" and len(parts) >= 4:
                commit = self._commit(repo, unquote(parts[3]))
                prefix = unquote("/".join(parts[4:]))
                return _tree(repo.commits[commit], prefix) + hub.hostile.extra_tree
            raise HubError(404, "NotFound", f"no API route {rest}")

        def _resolve(self, path: str, send_body: bool) -> None:
            if hub.hostile.redirect_loop:
                self._send_answer(302, {"Location": path})
                return
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            revision, _, filename = rest.partition("/")
            repo = self._repo(repo_id, need_files=True)
            commit = self._commit(repo, unquote(revision))
            file = repo.commits[commit].get(unquote(filename))
            if file is None:
                raise HubError(404, "EntryNotFound", f"{filename} not in {repo_id}", commit)
            start = _range_start(self.headers.get("Range"))
            body = hub.hostile.bodies.get(unquote(filename))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{file.sha256 if file.lfs else file.git_sha1}"')
            if body == "endless":
                self.send_header("Connection", "close")
            else:
                extra = {"longer": 1024, "shorter": -1024}.get(body or "", 0)
                self.send_header("Content-Length", str(file.size - start + extra))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{file.size - 1}/{file.size}")
            self.end_headers()
            if send_body:
                corrupt = (repo_id, unquote(filename)) in hub.corrupt
                self._stream(file, start, corrupt, body)

        def _stream(self, file: HubFile, start: int, corrupt: bool, body: Body | None) -> None:
            if not corrupt and body is None and not hub.bytes_per_s:
                self._send_file(file, start)
                return
            data = bytearray(file.source.read_bytes())
            if corrupt:
                data[len(data) // 2] ^= 0xFF
            if body == "longer":
                data += b"\0" * 1024
            elif body == "shorter":
                data = data[:-1024]
            elif body == "endless":
                while True:
                    self.wfile.write(b"\0" * (64 << 10))
            elif body == "stall":  # the first half, then nothing: every resume stalls again
                self.wfile.write(data[start : len(data) // 2])
                self.wfile.flush()
                hub.stalled.wait()  # until the test ends: the client must give up first
                return
            step = 64 << 10
            for offset in range(start, len(data), step):
                self.wfile.write(data[offset : offset + step])
                if hub.bytes_per_s:
                    time.sleep(step / hub.bytes_per_s)

        def _send_file(self, file: HubFile, start: int) -> None:
            """The kernel copies the file to the socket, as a real hub's file server does, so
            the server's CPU (and this process's GIL) stays out of a client's figures."""
            self.wfile.flush()
            with file.source.open("rb") as source:
                offset = start
                while offset < file.size:
                    sent = os.sendfile(self.connection.fileno(), source.fileno(), offset,
                                       file.size - offset)  # fmt: skip
                    if sent == 0:
                        raise ConnectionError(f"{file.source}: the client stopped reading")
                    offset += sent

        def _repo(self, repo_id: str, need_files: bool) -> HubRepo:
            repo = hub.repos.get(repo_id)
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            authorized = token in hub.tokens
            if repo is None or (repo.private and not authorized):
                raise HubError(401, "RepoNotFound", f"Repository Not Found for url: {repo_id}")
            if repo.gated and need_files and not authorized:
                raise HubError(401, "GatedRepo", f"Access to model {repo_id} is restricted; log in")
            return repo

        def _commit(self, repo: HubRepo, revision: str) -> str:
            commit = repo.resolve(revision)
            if commit is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return commit

        def _send_json(self, payload: Any, send_body: bool) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _send_answer(self, status: int, headers: dict[str, str]) -> None:
            body = json.dumps({"error": f"hostile answer {status}"}).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _send_error(self, error: HubError, send_body: bool) -> None:
            body = json.dumps({"error": str(error)}).encode()
            self.send_response(error.status)
            self.send_header("X-Error-Code", error.code)
            self.send_header("X-Error-Message", str(error))
            if error.commit:
                self.send_header("X-Repo-Commit", error.commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

    return Handler


def _info(repo: HubRepo, commit: str) -> dict[str, Any]:
    return {
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "sha": commit,
        "lastModified": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z",
        "private": repo.private,
        "gated": "manual" if repo.gated else False,
        "disabled": False,
        "tags": [],
        "siblings": [{"rfilename": name} for name in sorted(repo.commits[commit])],
    }


def _tree(files: dict[str, HubFile], prefix: str) -> list[dict[str, Any]]:
    entries = []
    for name, file in sorted(files.items()):
        if prefix and not name.startswith(prefix.rstrip("/") + "/"):
            continue
        entry: dict[str, Any] = {"type": "file", "oid": file.git_sha1, "size": file.size}
        entry["path"] = name
        if file.lfs:
            entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": 134}
        entries.append(entry)
    return entries


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header.removeprefix("bytes=").split("-")[0] or 0)


def main(argv: list[str]) -> None:
    """`hub_server.py PORT ORG/NAME=MODEL_DIR ...`: serve each directory as one commit (in
    order, on main) of its repo on 127.0.0.1:PORT, in whatever network namespace this runs in
    (a booted system's); print one line `serving ENDPOINT COMMIT...`; run until killed."""
    port, *repos = argv
    with HubServer(port=int(port)) as hub:
        commits = []
        for spec in repos:
            repo_id, _, model_dir = spec.partition("=")
            repo = hub.repos.get(repo_id) or hub.add_repo(repo_id)
            commits.append(repo.commit(Path(model_dir)))
        print("serving", hub.endpoint, *commits, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
