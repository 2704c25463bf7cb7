"""A version's compile cache: what vLLM, Inductor and Triton compiled for it, kept beside it in
the store so that a box whose key matches starts warm.

In the store, each cache is a folder of its own beside the version's files:

    versions/<v>/compile-cache/<keyid>/cache.json    the key and every file's sha256 and size
    versions/<v>/compile-cache/<keyid>/files/...      vLLM's cache root and Inductor's, as used

On the box, the engine compiles into `CACHE_DIR/compile/<keyid>/{vllm,inductor}`
(VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR): one folder per key, so what an engine used is
exactly its key's folder, and an import puts a stored cache where the next start looks.

The key is what must match for the compiled code to be reused (`CompileKey`): the device (a
GPU's name and architecture, or the CPU's instruction set as torch picks it), the driver, the
Python, torch, vLLM (and on a GPU Triton) versions, the model's layout and the engine settings
that change the graphs. A cache is a folder of compiled code the engine loads and runs: it is
copied in only after every file's size and sha256 match its `cache.json`, and anything wrong with
it (unreadable, a file changed, another key) is logged and ignored: the engine compiles as it
would without one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ValidationError

from edgeagent.errors import CorruptArtifactError, InsufficientDiskError, StoppedError
from edgeagent.store.compile_key import CompileKey
from edgeagent.store.durable import fsync_dir, fsync_tree, write_durably
from edgeagent.store.manifest import sha256_of
from edgeagent.store.snapshot import copy_member, list_members

logger = logging.getLogger(__name__)

CACHE_FOLDER = "compile-cache"  # beside a version's files, in the store and in a source
CACHE_MANIFEST = "cache.json"
FILES = "files"
BOX_FOLDER = "compile"  # under CACHE_DIR: one folder per key
MAX_MANIFEST_BYTES = 8 << 20
KEYID = re.compile(r"^[0-9a-f]{16}$")
# Never part of a cache: lock files, and what a compile leaves half-written.
SKIPPED = re.compile(r"(^|/)(locks/|[^/]*\.lock$|tmp[^/]*$|\.[^/]*$)")
# -- the stored format -------------------------------------------------------------------------


class CacheFile(BaseModel):
    path: str
    sha256: str
    size: int


class CacheManifest(BaseModel):
    format: Literal[1] = 1
    keyid: str
    key: dict[str, str]
    files: list[CacheFile]
    created: datetime
    made_from: str  # the version whose engine compiled it

    @property
    def compile_key(self) -> CompileKey:
        return CompileKey.of(self.key)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def read_manifest(bundle: Path) -> CacheManifest:
    """A cache's `cache.json`, checked for form: CorruptArtifactError otherwise."""
    path = bundle / CACHE_MANIFEST
    try:
        with path.open("rb") as file:
            data = file.read(MAX_MANIFEST_BYTES + 1)
    except OSError as error:
        raise CorruptArtifactError(f"{path}: cannot read it ({error.strerror})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise CorruptArtifactError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = CacheManifest.model_validate_json(data)
    except ValidationError as error:
        first = str(error).splitlines()[0]
        raise CorruptArtifactError(f"{path}: not a compile cache manifest ({first})") from None
    if manifest.compile_key.keyid != manifest.keyid or manifest.keyid != bundle.name:
        raise CorruptArtifactError(
            f"{path}: its key hashes to {manifest.compile_key.keyid}, but it is named "
            f"{manifest.keyid} in a folder named {bundle.name}"
        )
    for entry in manifest.files:
        if not _safe_relative(entry.path) or not re.fullmatch(r"[0-9a-f]{64}", entry.sha256):
            raise CorruptArtifactError(f"{path}: refused entry {entry.path!r}")
    return manifest


def verify(bundle: Path, manifest: CacheManifest, cancel: threading.Event | None = None) -> None:
    """Every listed file is a regular file of its size and sha256, and nothing else is there:
    CorruptArtifactError naming the first that is not."""
    root = bundle / FILES
    listed = {entry.path for entry in manifest.files}
    for entry in manifest.files:
        path = root / entry.path
        try:
            status = path.lstat()
        except OSError:
            raise CorruptArtifactError(f"{entry.path} is missing") from None
        if not stat.S_ISREG(status.st_mode):
            raise CorruptArtifactError(f"{entry.path} is not a regular file")
        if status.st_size != entry.size:
            raise CorruptArtifactError(f"{entry.path}: {status.st_size} bytes, listed {entry.size}")
        if (actual := sha256_of(path, cancel)) != entry.sha256:
            raise CorruptArtifactError(
                f"{entry.path}: sha256 {actual[:12]}…, listed {entry.sha256[:12]}…"
            )
    for relative in _tree(root):
        if relative not in listed:
            raise CorruptArtifactError(f"{relative} is not listed in {CACHE_MANIFEST}")


def build_bundle(
    source: Path, key: CompileKey, made_from: str, scratch: Path,
    cancel: threading.Event | None = None,
) -> tuple[Path, CacheManifest] | None:  # fmt: skip
    """A copy of the compile cache at `source` (a box's key folder) in `scratch`, each file
    hashed as copied, with its `cache.json`, fsync'd: ready to be renamed into a version
    (`install`). None when nothing compiled is there."""
    members = [p for p in _tree(source) if not SKIPPED.search(p)]
    if not members:
        return None
    building = scratch / key.keyid
    files = []
    for relative in members:
        if cancel is not None and cancel.is_set():
            raise StoppedError("the compile cache export was cancelled")
        copied = building / FILES / relative
        copied.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # a temporary file gone meanwhile
            shutil.copyfile(source / relative, copied, follow_symlinks=False)
            files.append(CacheFile(path=relative, sha256=sha256_of(copied, cancel),
                                   size=copied.stat().st_size))  # fmt: skip
    manifest = CacheManifest(keyid=key.keyid, key=key.as_dict, files=files,
                             created=datetime.now(UTC), made_from=made_from)  # fmt: skip
    write_durably(building / CACHE_MANIFEST, manifest.model_dump_json(indent=1).encode())
    fsync_tree(building)
    return building, manifest


def check_in(
    source: Path, scratch: Path, cancel: threading.Event | None = None
) -> tuple[Path, CacheManifest]:
    """A checked copy in `scratch` of the cache folder `source` (from a drop or a download: not
    trusted): its `cache.json` read, only the files it lists copied, never through a link, each
    of its size and sha256; CorruptArtifactError otherwise. Ready for `install`."""
    manifest = read_manifest(source)
    # links or special files anywhere refuse it (snapshot.py, as for a drop's model files)
    members = {m.relative: m for m in list_members(source, follow_links=False)}
    building = scratch / manifest.keyid
    for entry in manifest.files:
        member = members.get(f"{FILES}/{entry.path}")
        if member is None:
            raise CorruptArtifactError(f"{entry.path} is missing")
        if member.status.st_size != entry.size:  # checked before reading it
            raise CorruptArtifactError(
                f"{entry.path}: {member.status.st_size} bytes, listed {entry.size}"
            )
        copied = building / FILES / entry.path
        copied.parent.mkdir(parents=True, exist_ok=True)
        copy_member(source, member, copied, follow_links=False)
    (building / FILES).mkdir(parents=True, exist_ok=True)
    verify(building, manifest, cancel)
    write_durably(building / CACHE_MANIFEST, manifest.model_dump_json(indent=1).encode())
    fsync_tree(building)
    return building, manifest


def install(building: Path, version_dir: Path) -> bool:
    """Rename a built or checked cache into `version_dir` (call with the store locked); False
    when the version is gone or already has a cache of that key (kept: either is good)."""
    if not (version_dir / "manifest.json").is_file():
        return False
    folder = version_dir / CACHE_FOLDER
    folder.mkdir(exist_ok=True)
    try:
        os.rename(building, folder / building.name)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    fsync_dir(folder)
    fsync_dir(version_dir)
    return True


def place(bundle: Path, manifest: CacheManifest, box_dir: Path) -> None:
    """Copy a verified cache's files into `box_dir` (which must not exist yet), whole."""
    box_dir.parent.mkdir(parents=True, exist_ok=True)
    building = box_dir.with_name(f".{box_dir.name}-{secrets.token_hex(4)}")
    try:
        for entry in manifest.files:
            target = building / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle / FILES / entry.path, target, follow_symlinks=False)
        building.mkdir(parents=True, exist_ok=True)
        os.rename(building, box_dir)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def stored_caches(version_dir: Path) -> Iterator[Path]:
    """The cache folders a stored version carries (not yet checked)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted((version_dir / CACHE_FOLDER).iterdir()):
            if KEYID.match(entry.name) and entry.is_dir() and not entry.is_symlink():
                yield entry


def box_files(box_dir: Path) -> set[str]:
    """The compiled files in a box's key folder (what an engine start adds shows here)."""
    return {p for p in _tree(box_dir) if not SKIPPED.search(p)}


class _Trust(Protocol):
    @property
    def required(self) -> bool: ...


class _Store(Protocol):
    """What of the model store (store.py) taking a source's caches needs."""

    versions: Path
    compile_caches_from_sources: bool

    @property
    def trust(self) -> _Trust: ...
    def ensure_free(self, needed_bytes: int, what: str) -> None: ...
    def staging(self, key: str | None = None) -> AbstractContextManager[Path]: ...
    def locked(self) -> AbstractContextManager[None]: ...


def caches_allowed(store: _Store, origin: str) -> bool:
    """Whether the store takes compile caches from sources (said in the log when not)."""
    if not store.compile_caches_from_sources:
        logger.info("compile cache from %s: not taken (store.compile_cache_from_sources)", origin)
        return False
    if store.trust.required:
        logger.warning(
            "compile cache from %s: not taken: signatures are required and a compile cache is "
            "compiled code no signature covers; this box compiles and stores its own", origin
        )  # fmt: skip
        return False
    return True


def take_compile_caches(store: _Store, folder: Path, version: str, origin: str) -> list[str]:
    """The compile caches a source brought for `version` (its `compile-cache/` folder), each
    checked and stored beside it; one that fails is logged and left out, and the version stays
    as committed. Returns the keys stored."""
    if not folder.is_dir() or folder.is_symlink() or not caches_allowed(store, origin):
        return []
    taken = []
    for bundle in sorted(folder.iterdir()):
        try:
            if bundle.is_symlink() or not bundle.is_dir() or not KEYID.match(bundle.name):
                raise CorruptArtifactError("not a compile cache folder")
            store.ensure_free(read_manifest(bundle).total_bytes, f"the compile cache {bundle.name}")
            with store.staging() as scratch:
                building, manifest = check_in(bundle, scratch)
                with store.locked():
                    if install(building, store.versions / version):
                        taken.append(manifest.keyid)
        except (CorruptArtifactError, InsufficientDiskError, OSError) as error:
            logger.warning("compile cache %s from %s: not taken (%s)", bundle.name, origin, error)
    for keyid in taken:
        logger.info("compile cache %s from %s: stored beside %s", keyid, origin, version)
    return taken


def remove(bundle: Path) -> None:
    """Drop a stored cache that failed its check (renamed away first: never half a cache)."""
    trash = bundle.with_name(f".removed-{bundle.name}-{secrets.token_hex(4)}")
    with contextlib.suppress(OSError):
        os.rename(bundle, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _tree(root: Path) -> list[str]:
    """Every regular file under `root`, relative, links not followed; [] if there is none."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if stat.S_ISREG(path.lstat().st_mode):
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def _safe_relative(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)
