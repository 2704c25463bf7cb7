"""The model store: verified, content-addressed versions, with `current` and `previous`.

Layout under the root (huggingface_hub's blobs/snapshots, named by sha256 like Ollama's blobs):

    blobs/sha256/<hex>              each file's bytes once, read-only
    versions/<id>/manifest.json     what the version is (see manifest.py)
    versions/<id>/model/<path>      relative symlinks into blobs: the directory vLLM loads
    staging/<name>/                 work in progress (downloads, builds); never loaded
    refs.json                       {"current": id, "previous": id}, replaced atomically
    .lock                           flock held while the store changes

A version appears only by renaming a complete, fsync'd directory into versions/, after every
file was hashed and checked; refs.json names only such versions. A process killed at any point
leaves either the old state or the new one, plus debris in staging/ or unreferenced blobs that
`gc` removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ValidationError

from edgeagent.errors import (
    CorruptArtifactError,
    InsufficientDiskError,
    NotFoundError,
    SignatureError,
    UnavailableError,
)
from edgeagent.settings import GiB, Settings
from edgeagent.store.compile_cache import CACHE_FOLDER, take_compile_caches
from edgeagent.store.durable import fsync_dir, fsync_file, write_durably
from edgeagent.store.eval_file import EVAL_FILE, read_eval_file
from edgeagent.store.manifest import (
    FileEntry,
    Manifest,
    SignatureRecord,
    Source,
    git_blob_sha1,
    new_manifest,
    sha256_of,
    source_label,
)
from edgeagent.store.snapshot import copy_member, list_members
from edgeagent.store.trust import SIGNATURE_FILE, TrustPolicy, read_signature

logger = logging.getLogger(__name__)

IGNORED_IN_STAGING = {".cache", ".gitattributes"}
NOT_MODEL_FILES = frozenset({CACHE_FOLDER})  # in a directory imported: taken apart
VERIFIED = "verified.json"  # in a version's directory: each file's identity when last hashed


class Expected(NamedTuple):
    """What the source says a file is: its size and the digest(s) it published."""

    size: int
    sha256: str | None = None
    git_sha1: str | None = None


class Refs(BaseModel):
    current: str | None = None
    previous: str | None = None


@dataclass
class GcReport:
    removed_versions: list[str] = field(default_factory=list)
    removed_blobs: int = 0
    removed_staging: int = 0
    freed_bytes: int = 0


class ModelStore:
    def __init__(
        self, root: Path, *, min_free_bytes: int = 0, trust: TrustPolicy | None = None,
        compile_caches_from_sources: bool = True,
    ) -> None:  # fmt: skip
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.trust = trust or TrustPolicy()
        self.compile_caches_from_sources = compile_caches_from_sources
        self.blobs = root / "blobs" / "sha256"
        self.versions = root / "versions"
        self.staging_root = root / "staging"
        for directory in (self.blobs, self.versions, self.staging_root):
            directory.mkdir(parents=True, exist_ok=True)

    # -- reading -----------------------------------------------------------------------------

    def refs(self) -> Refs:
        try:
            return Refs.model_validate_json((self.root / "refs.json").read_bytes())
        except FileNotFoundError:
            return Refs()

    def manifests(self) -> list[Manifest]:
        """Every committed version, oldest first."""
        manifests = []
        for directory in self.versions.iterdir():
            with contextlib.suppress(CorruptArtifactError):
                manifests.append(self._read_manifest(directory.name))
        return sorted(manifests, key=lambda m: m.created)

    def manifest(self, version: str) -> Manifest:
        """A version by id or unique id prefix; `current` and `previous` name the refs."""
        return self._read_manifest(self.resolve(version))

    def resolve(self, version: str) -> str:
        if version in ("current", "previous"):
            resolved = getattr(self.refs(), version)
            if resolved is None:
                raise NotFoundError(f"the store has no {version} version")
            return str(resolved)
        matches = [d.name for d in self.versions.iterdir() if d.name.startswith(version)]
        if len(matches) != 1:
            problem = "no version" if not matches else f"{len(matches)} versions"
            raise NotFoundError(f"{problem} in the store match {version!r}")
        return matches[0]

    def model_dir(self, version: str) -> Path:
        return self.versions / self.resolve(version) / "model"

    def link_model(self, version: str, link: Path) -> Path:
        """Point `link` at `version`'s model (atomically) and return it: a path that does not
        change from version to version.

        vLLM keys its compile cache on the model's path among other things: started from
        each version's own directory, the first start after every update recompiled (37 s of a
        66 s warm start on an H200, against 24 s at the path the cache was made for). Through
        one link every version of one layout finds the same cache. The engine reads the files
        only while it starts, so the link may be repointed once it runs."""
        link.parent.mkdir(parents=True, exist_ok=True)
        temporary = link.with_name(f".{link.name}-{secrets.token_hex(4)}")
        temporary.symlink_to(self.model_dir(version).absolute())
        os.replace(temporary, link)
        fsync_dir(link.parent)
        return link

    def version_at(self, path: Path) -> str | None:
        """The stored version whose model `path` is (or links to); None outside the store."""
        model = path.resolve()
        if model.name != "model" or model.parent.parent != self.versions.resolve():
            return None
        return model.parent.name

    def find_hub_version(self, repo: str, revision: str) -> Manifest | None:
        """The newest stored version fetched from repo at revision (a ref name or a commit)."""
        for manifest in reversed(self.manifests()):
            source = manifest.source
            if source.kind != "hub" or source.repo != repo:
                continue
            if revision in (source.revision, source.commit) or (
                len(revision) >= 7 and source.commit.startswith(revision)
            ):
                return manifest
        return None

    def has_blob(self, sha256: str) -> bool:
        return (self.blobs / sha256).is_file()

    def _read_manifest(self, version: str) -> Manifest:
        path = self.versions / version / "manifest.json"
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"no version {version} in the store") from None
        except ValidationError as error:
            raise CorruptArtifactError(f"{path}: unreadable manifest ({error})") from None

    # -- verification ------------------------------------------------------------------------

    def verify(
        self, version: str, *, full: bool = True, cancel: threading.Event | None = None
    ) -> Manifest:
        """Check every file's size (and sha256 when full); a corrupt blob is moved aside. Then,
        where signatures are required, the version's signature (SignatureError).

        Moving it aside means a later fetch or import of the same bytes heals the version.
        """
        manifest = self.manifest(version)
        model = self.model_dir(manifest.version)
        problems = []
        for entry in manifest.files:
            problem = self._check_file(model / entry.path, entry, full, cancel)
            if problem:
                problems.append(f"{entry.path}: {problem}")
                self._quarantine(entry.sha256)
        if problems:
            raise CorruptArtifactError(
                f"version {manifest.version} failed verification: " + "; ".join(problems)
            )
        if full:
            self._record_verified(manifest)
        self.trust.check(manifest)
        return manifest

    def verified_unchanged(self, version: str) -> Manifest | None:
        """The manifest, when every file is still the inode, size and modification time recorded
        when its bytes were last hashed; None when anything differs or nothing was recorded.

        Lets a start skip re-hashing gigabytes it hashed before (10 s for Phi-4 on an H100) and
        check them after it serves. A blob is read-only and only ever replaced whole, so
        a change of its bytes through the store's own paths shows in these three; what this
        does not catch (a bit flip on the disk) the full check after the start does."""
        manifest = self.manifest(version)
        try:
            recorded = json.loads((self.versions / manifest.version / VERIFIED).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        model = self.model_dir(manifest.version)
        for entry in manifest.files:
            try:
                now = _identity(model / entry.path)
            except FileNotFoundError:
                return None
            if recorded.get(entry.path) != now or now[1] != entry.size:
                return None
        self.trust.check(manifest)
        return manifest

    def _record_verified(self, manifest: Manifest) -> None:
        model = self.model_dir(manifest.version)
        identities = {entry.path: _identity(model / entry.path) for entry in manifest.files}
        write_durably(self.versions / manifest.version / VERIFIED, json.dumps(identities).encode())

    def _check_file(
        self, path: Path, entry: FileEntry, full: bool, cancel: threading.Event | None
    ) -> str | None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "missing"
        if size != entry.size:
            return f"{size} bytes, expected {entry.size}"
        if full and (actual := sha256_of(path, cancel)) != entry.sha256:
            return f"sha256 {actual[:12]}…, expected {entry.sha256[:12]}…"
        return None

    def _quarantine(self, sha256: str) -> None:
        blob = self.blobs / sha256
        with contextlib.suppress(FileNotFoundError):
            blob.rename(blob.with_name(f"{sha256}.corrupt"))
            logger.error("moved corrupt blob %s aside", blob)

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def staging(self, key: str | None = None) -> Iterator[Path]:
        """A private work directory inside the store's filesystem.

        Keyed staging (a download) is kept when the work fails, so the next attempt resumes;
        unkeyed staging is removed, and so is any refused for its signature (nothing of an
        untrusted version stays). Either is removed after a successful commit.
        """
        name = key or f"tmp-{secrets.token_hex(6)}"
        path = self.staging_root / name
        with (self.staging_root / f"{name}.lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UnavailableError(f"another process is already working on {name}") from None
            path.mkdir(exist_ok=True)
            try:
                yield path
            except BaseException as error:
                if key is None or isinstance(error, SignatureError):
                    self._discard_staging(name)
                raise
            self._discard_staging(name)

    def _discard_staging(self, name: str) -> None:
        shutil.rmtree(self.staging_root / name, ignore_errors=True)
        (self.staging_root / f"{name}.lock").unlink(missing_ok=True)

    def ensure_free(self, needed_bytes: int, what: str) -> None:
        free = shutil.disk_usage(self.root).free
        if free - needed_bytes < self.min_free_bytes:
            raise InsufficientDiskError(
                f"{what} needs {_gib(needed_bytes)} and {_gib(self.min_free_bytes)} must stay "
                f"free, but {self.root} has {_gib(free)} free; free some space "
                f"(`edgeagent models gc` removes old versions) and retry"
            )

    def commit(
        self, staged: Path, source: Source, expected: Mapping[str, Expected] | None = None,
        hashed: Mapping[str, str] | None = None,
    ) -> Manifest:  # fmt: skip
        """Hash and check every staged file, then make it a version; returns its manifest.

        `hashed` gives the sha256 of files whose bytes were hashed (and checked against
        `expected`) as they were written into this staging, so they are not read again.
        A fetched or imported version must satisfy `trust` (a build is admitted, and served
        once signed); a signature beside the files (`model.sig`) is recorded, not committed
        as a file."""
        files = self._hash_staged(staged, expected, hashed or {})
        _check_eval_file(staged, files)
        signature = None
        if source.kind != "build":
            bundle = read_signature(staged / SIGNATURE_FILE)
            signature = self.trust.admit(bundle, files, source_label(source))
        manifest = new_manifest(staged, files, source, signature)
        with self.locked():
            final = self.versions / manifest.version
            for entry in files:
                self._link_blob(staged / entry.path, entry.sha256)
            fsync_dir(self.blobs)
            if final.is_dir():
                logger.info("version %s is already in the store", manifest.version)
                return self._with_signature(manifest.version, signature)
            self._write_version(manifest)
            self._record_verified(manifest)  # its bytes were all hashed just now
        logger.info(
            "committed version %s (%s, %d files, %s)",
            manifest.version,
            manifest.source_label,
            len(files),
            _gib(manifest.total_bytes),
        )
        return manifest

    def record_signature(self, version: str, signature: SignatureRecord) -> Manifest:
        """Record a signature made for a stored version (`edgeagent sign VERSION`)."""
        with self.locked():
            return self._with_signature(self.resolve(version), signature)

    def _with_signature(self, version: str, signature: SignatureRecord | None) -> Manifest:
        """The stored manifest, its signature replaced by a newer one (under the lock)."""
        manifest = self._read_manifest(version)
        if signature is None or manifest.signature == signature:
            return manifest
        manifest = manifest.model_copy(update={"signature": signature})
        write_durably(self.versions / version / "manifest.json",
                      manifest.model_dump_json(indent=2).encode())  # fmt: skip
        logger.info("version %s: signature recorded (%s)", version, signature.checked)
        return manifest

    def import_directory(
        self, directory: Path, source: Source, *, follow_links: bool = True
    ) -> Manifest:
        """Copy a model directory in, then commit it like any other. Only regular files are
        taken, each as it was when listed (`snapshot.py`); `follow_links=False` for a
        directory that is not trusted (a drop): a symlink anywhere refuses it. A compile cache
        the directory brings (`compile-cache/`) is taken beside the version when it checks out
        (compile_cache.py), never as one of its files."""
        members = list_members(directory, follow_links=follow_links, skip=NOT_MODEL_FILES)
        if not any(m.relative == "config.json" for m in members):
            raise CorruptArtifactError(f"{directory}: no config.json; not a model directory")
        self.ensure_free(sum(m.status.st_size for m in members), f"importing {directory}")
        with self.staging() as staged:
            for member in members:
                target = staged / member.relative
                target.parent.mkdir(parents=True, exist_ok=True)
                copy_member(directory, member, target, follow_links=follow_links)
            manifest = self.commit(staged, source)
        take_compile_caches(self, directory / CACHE_FOLDER, manifest.version, str(directory))
        return manifest

    def _hash_staged(
        self, staged: Path, expected: Mapping[str, Expected] | None, hashed: Mapping[str, str]
    ) -> list[FileEntry]:
        found = {
            path.relative_to(staged).as_posix(): path
            for path in sorted(staged.rglob("*"))
            if path.is_file() and not IGNORED_IN_STAGING & set(path.relative_to(staged).parts)
        }
        found.pop(SIGNATURE_FILE, None)  # recorded in the manifest, not a file of the version
        if expected is not None and (missing := sorted(set(expected) - set(found))):
            raise CorruptArtifactError(f"files missing from the download: {', '.join(missing)}")
        entries = []
        for relative, path in found.items():
            known = hashed.get(relative)
            entry = FileEntry(path=relative, sha256=known or sha256_of(path),
                              size=path.stat().st_size)  # fmt: skip
            if expected is not None and relative in expected and not known:
                _check_expected(path, entry, expected[relative])
            entries.append(entry)
        if not entries:
            raise CorruptArtifactError(f"{staged}: nothing to commit")
        return entries

    def _link_blob(self, path: Path, sha256: str) -> None:
        blob = self.blobs / sha256
        if blob.exists():
            return
        fsync_file(path)
        os.chmod(path, 0o444)
        os.link(path, blob)

    def _write_version(self, manifest: Manifest) -> None:
        building = self.staging_root / f".version-{manifest.version}-{secrets.token_hex(4)}"
        model = building / "model"
        model.mkdir(parents=True)
        for entry in manifest.files:
            link = model / entry.path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(self.blobs / entry.sha256, link.parent))
        write_durably(building / "manifest.json", manifest.model_dump_json(indent=2).encode())
        for directory in sorted({(model / e.path).parent for e in manifest.files}, reverse=True):
            fsync_dir(directory)
        fsync_dir(building)
        building.rename(self.versions / manifest.version)
        fsync_dir(self.versions)

    def activate(self, version: str) -> Refs:
        """Make a version current; the old current becomes previous."""
        with self.locked():
            resolved = self.resolve(version)
            refs = self.refs()
            if refs.current == resolved:
                return refs
            return self._write_refs(Refs(current=resolved, previous=refs.current))

    def rollback(self) -> Refs:
        """Swap current and previous."""
        with self.locked():
            refs = self.refs()
            if refs.previous is None:
                raise NotFoundError("no previous version to roll back to")
            return self._write_refs(Refs(current=refs.previous, previous=refs.current))

    def _write_refs(self, refs: Refs) -> Refs:
        write_durably(self.root / "refs.json", refs.model_dump_json().encode())
        logger.info("current version %s (previous %s)", refs.current, refs.previous)
        return refs

    def gc(self, keep: int) -> GcReport:
        """Keep the newest `keep` versions plus current and previous; drop everything else."""
        report = GcReport()
        with self.locked():
            refs = self.refs()
            newest = [m.version for m in reversed(self.manifests())][:keep]
            for directory in list(self.versions.iterdir()):
                if directory.name not in {*newest, refs.current, refs.previous}:
                    trash = self.staging_root / f".trash-{directory.name}"
                    directory.rename(trash)
                    report.removed_versions.append(directory.name)
            self._remove_unreferenced_blobs(report)
            self._remove_abandoned_staging(report)
        return report

    def _remove_unreferenced_blobs(self, report: GcReport) -> None:
        referenced = {entry.sha256 for m in self.manifests() for entry in m.files}
        for blob in self.blobs.iterdir():
            if blob.name not in referenced:
                report.freed_bytes += blob.stat().st_size
                report.removed_blobs += 1
                blob.unlink()

    def _remove_abandoned_staging(self, report: GcReport) -> None:
        """Staging that no process holds: interrupted downloads and builds, trash."""
        names = {p.name.removesuffix(".lock") for p in self.staging_root.iterdir()}
        for name in names:
            path, lock_path = self.staging_root / name, self.staging_root / f"{name}.lock"
            with lock_path.open("a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use by a running fetch or build
                if path.exists():
                    report.freed_bytes += _tree_size(path)
                    report.removed_staging += not name.startswith(".trash-")
                    shutil.rmtree(path, ignore_errors=True)
                lock_path.unlink()


def open_store(settings: Settings) -> ModelStore:
    """The store as the settings describe it: its directory and the free space it keeps."""
    return ModelStore(settings.models_dir, min_free_bytes=int(settings.store.min_free_gib * GiB),
                      trust=TrustPolicy.from_settings(settings.trust),
                      compile_caches_from_sources=settings.store.compile_cache
                      and settings.store.compile_cache_from_sources)  # fmt: skip


def _check_eval_file(staged: Path, files: list[FileEntry]) -> None:
    """A version that ships an eval set ships a valid one (store/eval_file.py)."""
    if any(entry.path == EVAL_FILE for entry in files):
        try:
            read_eval_file(staged / EVAL_FILE)
        except ValueError as error:
            message = str(error).replace(str(staged / EVAL_FILE), EVAL_FILE)
            raise CorruptArtifactError(f"the version's eval set {message}") from None


def _check_expected(path: Path, entry: FileEntry, expected: Expected) -> None:
    problem = None
    if entry.size != expected.size:
        problem = f"{entry.size} bytes, the source says {expected.size}"
    elif expected.sha256 and entry.sha256 != expected.sha256:
        problem = f"sha256 {entry.sha256[:12]}…, the source says {expected.sha256[:12]}…"
    elif expected.git_sha1 and (actual := git_blob_sha1(path)) != expected.git_sha1:
        problem = f"git blob id {actual[:12]}…, the source says {expected.git_sha1[:12]}…"
    if problem:
        path.unlink()  # so that a retry downloads it again
        raise CorruptArtifactError(f"{entry.path}: {problem}; refused")


def _identity(path: Path) -> list[int]:
    """What a file's bytes cannot change without changing: inode, size, modification time."""
    status = path.stat()
    return [status.st_ino, status.st_size, status.st_mtime_ns]


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB" if size >= 1 << 28 else f"{size / (1 << 20):.1f} MiB"
