"""Fetch a model from the Hugging Face Hub (or a mirror at `HF_ENDPOINT`) into the store.

huggingface_hub resolves the revision to a commit and lists the files with their sizes and
digests; everything it says is checked first (`hub_checks.py`: the hub may be hostile). Each
file is then downloaded to `<name>.part` in a staging directory keyed by repo and commit
(`hub_download.py`: resumable across processes, verified as it arrives, never longer than
listed), so a later fetch of the same commit continues where the last one stopped. The store
checks every file against the hub's digests again before committing.

A repo may carry a signature, `model.sig` at its root (store/trust.py). It is downloaded first:
where signatures are required, a repo without one is refused before any download, and one that
names another key before the weights are fetched; every other file it signs is fetched with the
model's, and the store checks the whole set when it commits.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils._headers import build_hf_headers

from edgeagent.errors import (
    AccessDeniedError,
    ConfigError,
    CorruptArtifactError,
    HubUnreachableError,
    InsufficientDiskError,
    NotFoundError,
    SignatureError,
)
from edgeagent.progress import Progress
from edgeagent.sources.hub_caches import fetch_compile_caches, is_cache_file
from edgeagent.sources.hub_checks import check_commit, check_listing
from edgeagent.sources.hub_download import RetryPolicy, call_with_retries, download
from edgeagent.store.compile_key import probe_box
from edgeagent.store.eval_file import EVAL_FILE
from edgeagent.store.manifest import HubSource, Manifest
from edgeagent.store.store import Expected, ModelStore
from edgeagent.store.trust import SIGNATURE_FILE, read_signature, signed_paths

logger = logging.getLogger(__name__)

# What a safetensors model needs; never pickles, GGUF, images or READMEs.
MODEL_FILE_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")


@dataclass(frozen=True)
class HubTarget:
    repo: str
    revision: str = "main"

    @classmethod
    def parse(cls, text: str, default_revision: str = "main") -> HubTarget:
        repo, _, revision = text.partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ConfigError(f"{text!r}: expected ORG/NAME or ORG/NAME@REVISION")
        return cls(repo, revision or default_revision)

    def __str__(self) -> str:
        return f"{self.repo}@{self.revision}"


class HubFetcher:
    def __init__(
        self,
        store: ModelStore,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        offline: bool = False,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.store = store
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self._token = token
        self.offline = offline or constants.HF_HUB_OFFLINE
        self._api = HfApi(endpoint=self.endpoint, token=token)
        self._policy = policy or RetryPolicy()

    def fetch(self, target: HubTarget, cancel: threading.Event | None = None) -> Manifest:
        """Resolve, download what is missing, verify, commit; returns the version's manifest.

        Setting `cancel` stops the download within one network chunk; the next fetch of the
        same commit resumes it.
        """
        if self.offline:
            return self._from_store(target)
        with _hub_errors(target):
            commit = self._resolve(target, cancel)
            known = self.store.find_hub_version(target.repo, commit)
            if known is not None and self._admitted(known):
                logger.info("%s is commit %s, already stored as %s", target, commit, known.version)
                return known
            listing = self._listing(target.repo, commit, cancel)
            files = _model_files(listing, target.repo, commit)
            if not any(f.path == SIGNATURE_FILE for f in files):  # refused now if required
                self.store.trust.admit(None, (), f"{target.repo}@{commit[:10]}")
            key = f"fetch-{target.repo.replace('/', '--')}-{commit}"
            resumable = self.store.staging_root / key
            needed = sum(
                f.size - _staged_bytes(resumable, f.path) for f in files if not self._in_store(f)
            )
            self.store.ensure_free(needed, f"fetching {target.repo}@{commit[:10]}")
            with self.store.staging(key) as staged, _cleaned_up_when_the_disk_fills(staged):
                files = self._with_signed_files(target.repo, commit, files, listing, staged,
                                                cancel)  # fmt: skip
                hashed = self._download(target.repo, commit, files, staged, cancel)
                source = HubSource(
                    repo=target.repo, revision=target.revision, commit=commit,
                    endpoint=self.endpoint,
                )  # fmt: skip
                model_files = [f for f in files if f.path != SIGNATURE_FILE]
                manifest = self.store.commit(staged, source, _expected(model_files), hashed)
            fetch_compile_caches(
                self.store, listing, manifest.version, f"{target.repo}@{commit[:10]}",
                probe_box(), lambda file, root: self._download_file(target.repo, commit, file,
                                                                    root, cancel), cancel,
            )  # fmt: skip
            return manifest

    def _admitted(self, known: Manifest) -> bool:
        """A stored version of the commit may be returned as it is only when trust admits it
        (it may have been fetched before signatures were required, or before its signature)."""
        try:
            self.store.trust.check(known)
        except SignatureError as error:
            logger.warning("stored as %s but not admitted (%s): fetching it again with its "
                           "signature", known.version, error)  # fmt: skip
            return False
        return True

    def _with_signed_files(
        self, repo: str, commit: str, files: list[RepoFile], listing: list[RepoFile],
        staged: Path, cancel: threading.Event | None,
    ) -> list[RepoFile]:  # fmt: skip
        """`files` and, when the repo is signed, whatever else its signature names (a model
        card, say): the store checks the whole signed set. The signature comes first, so one
        naming another key is refused before the weights are downloaded."""
        signature = next((f for f in files if f.path == SIGNATURE_FILE), None)
        if signature is None:
            return files
        self._download_file(repo, commit, signature, staged, cancel)
        bundle = read_signature(staged / SIGNATURE_FILE) or ""
        self.store.trust.precheck(bundle, f"{repo}@{commit[:10]}")
        try:
            names = signed_paths(bundle)
        except SignatureError:
            return files  # not required (precheck passed): recorded as it is
        have = {f.path for f in files}
        extra = [entry for entry in listing if entry.path in names and entry.path not in have]
        if extra:
            self.store.ensure_free(sum(e.size for e in extra), f"the files {SIGNATURE_FILE} signs")
        return files + extra

    def resolve(self, target: HubTarget) -> str:
        """The commit `target.revision` names on the hub now (one small API call)."""
        if self.offline:
            raise HubUnreachableError(f"offline mode: cannot ask the hub about {target}")
        with _hub_errors(target):
            return self._resolve(target, None)

    def _from_store(self, target: HubTarget) -> Manifest:
        manifest = self.store.find_hub_version(target.repo, target.revision)
        if manifest is None:
            raise HubUnreachableError(
                f"offline mode: the store has no version of {target}; "
                f"fetch it while online, or copy it in with `edgeagent models import`"
            )
        logger.info("offline mode: %s served from the store as %s", target, manifest.version)
        return manifest

    def _resolve(self, target: HubTarget, cancel: threading.Event | None) -> str:
        info = call_with_retries(
            lambda: self._api.model_info(target.repo, revision=target.revision),
            f"resolving {target}", self._policy, cancel,
        )  # fmt: skip
        if not info.sha:
            raise NotFoundError(f"{target}: the hub did not name a commit")
        commit = check_commit(target.revision, info.sha)
        logger.info("%s resolved to commit %s", target, commit)
        return commit

    def _listing(self, repo: str, commit: str, cancel: threading.Event | None) -> list[RepoFile]:
        """Every file of the commit, each entry checked (`hub_checks.py`)."""
        entries = call_with_retries(
            lambda: list(self._api.list_repo_tree(repo, revision=commit, recursive=True)),
            f"listing {repo}@{commit[:10]}", self._policy, cancel,
        )  # fmt: skip
        return check_listing(entries)

    def _in_store(self, file: RepoFile) -> bool:
        return file.lfs is not None and self.store.has_blob(file.lfs.sha256)

    def _download(
        self,
        repo: str,
        commit: str,
        files: list[RepoFile],
        staged: Path,
        cancel: threading.Event | None,
    ) -> dict[str, str]:
        """Stage `files`; the sha256 of each file hashed (or linked from a blob) on the way."""
        total = sum(f.size for f in files)
        progress = Progress(f"fetch {repo}", total)
        progress.start_at(sum(_staged_bytes(staged, f.path) for f in files))
        hashed: dict[str, str] = {}
        with _watch_progress(progress, staged, files):
            for file in files:
                if sha256 := self._download_file(repo, commit, file, staged, cancel):
                    hashed[file.path] = sha256
        progress.finish()
        logger.info(
            "fetched %s@%s: %d files, %d bytes in %.1f s (%.0f MiB/s)",
            repo, commit[:10], len(files), total, progress.elapsed_s, progress.rate / (1 << 20),
        )  # fmt: skip
        return hashed

    def _download_file(
        self, repo: str, commit: str, file: RepoFile, staged: Path, cancel: threading.Event | None
    ) -> str | None:
        """Stage one file; its sha256 when known without reading it again (None for a file an
        interrupted fetch finished: the commit hashes that one)."""
        final = staged / file.path
        if not final.resolve().is_relative_to(staged.resolve()):  # checked paths; and again
            raise CorruptArtifactError(f"{file.path!r} would be written outside staging")
        if final.is_file() and final.stat().st_size == file.size:
            return None  # finished by an earlier, interrupted fetch
        final.parent.mkdir(parents=True, exist_ok=True)
        if file.lfs is not None and self.store.has_blob(file.lfs.sha256):
            os.link(self.store.blobs / file.lfs.sha256, final)  # same bytes as another version
            return file.lfs.sha256  # a blob's name is its verified sha256
        part = final.with_name(final.name + ".part")
        url = hf_hub_url(repo, file.path, revision=commit, endpoint=self.endpoint)
        if part.exists():
            logger.info("resuming %s at byte %d of %d", file.path, part.stat().st_size, file.size)
        headers = build_hf_headers(token=self._token)
        digests = download(url, part, _expected([file])[file.path], headers, self._policy, cancel)
        part.rename(final)
        return digests.sha256


def _model_files(listing: list[RepoFile], repo: str, commit: str) -> list[RepoFile]:
    """What a model needs from the listing, and its signature and eval set if it has them."""
    files = [
        entry
        for entry in listing
        if entry.path in (SIGNATURE_FILE, EVAL_FILE)
        or (not is_cache_file(entry.path)  # fetched apart, after the version (hub_caches.py)
            and any(fnmatch.fnmatch(entry.path.rsplit("/", 1)[-1], p) for p in MODEL_FILE_PATTERNS))
    ]  # fmt: skip
    if not any(f.path.endswith(".safetensors") for f in files):
        raise NotFoundError(f"{repo}@{commit[:10]} has no safetensors weights")
    if not any(f.path == "config.json" for f in files):
        raise NotFoundError(f"{repo}@{commit[:10]} has no config.json")
    return files


def _expected(files: list[RepoFile]) -> dict[str, Expected]:
    return {
        f.path: Expected(f.size, sha256=f.lfs.sha256)
        if f.lfs is not None
        else Expected(f.size, git_sha1=f.blob_id)
        for f in files
    }


def _staged_bytes(staged: Path, path: str) -> int:
    for candidate in (staged / path, staged / f"{path}.part"):
        with contextlib.suppress(FileNotFoundError):
            return candidate.stat().st_size
    return 0


@contextlib.contextmanager
def _watch_progress(progress: Progress, staged: Path, files: list[RepoFile]) -> Iterator[None]:
    """Report progress from the sizes of the staged files, every half second."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            progress.update(sum(_staged_bytes(staged, f.path) for f in files))

    watcher = threading.Thread(target=watch, name="fetch-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


@contextlib.contextmanager
def _cleaned_up_when_the_disk_fills(staged: Path) -> Iterator[None]:
    """A full disk stops the fetch and frees what it took: the box needs the space more than
    the next fetch needs to resume (the current version is untouched either way)."""
    try:
        yield
    except OSError as error:
        if error.errno == errno.ENOSPC:
            shutil.rmtree(staged, ignore_errors=True)
        raise


@contextlib.contextmanager
def _hub_errors(target: HubTarget) -> Iterator[None]:
    """huggingface_hub's errors and transport failures, said in edgeagent's terms."""
    try:
        yield
    except GatedRepoError:
        raise AccessDeniedError(
            f"{target.repo} is gated: accept its terms on the hub and set a token with access "
            f"(hub_token in $CREDENTIALS_DIRECTORY, or EDGEAGENT_HUB_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise NotFoundError(
            f"{target.repo}: no such repo on the hub, or it is private and the token has "
            f"no access to it"
        ) from None
    except RevisionNotFoundError:
        raise NotFoundError(f"{target.repo} has no revision {target.revision!r}") from None
    except EntryNotFoundError as error:
        raise NotFoundError(f"{target}: a file is missing on the hub ({error})") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        first_line = str(error).splitlines()[0] if str(error) else ""
        if status in (401, 403):
            raise AccessDeniedError(f"{target}: the hub refused access ({status})") from None
        if status == 404:
            raise NotFoundError(f"{target}: the hub answered 404 ({first_line})") from None
        raise HubUnreachableError(f"{target}: the hub answered {status}: {first_line}") from None
    except httpx2.TooManyRedirects:
        raise HubUnreachableError(
            f"{target}: the hub redirected too many times (a redirect loop); check HF_ENDPOINT"
        ) from None
    except (httpx2.TransportError, OfflineModeIsEnabled) as error:
        raise HubUnreachableError(
            f"cannot reach the hub for {target} ({error}); check the network or HF_ENDPOINT, "
            f"or run with offline mode to use what the store has"
        ) from None
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise InsufficientDiskError(
                f"the disk filled up while fetching {target}; what it had written is removed "
                f"and the current version is unchanged"
            ) from None
        raise
