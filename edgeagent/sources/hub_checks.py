"""Everything a hub or mirror says is checked before it is used: an edge box trusts no server.

A commit id must be 40 hex digits and, when a commit was pinned, the one pinned. Every listed
file must have a plain relative path that stays inside the download's staging directory and
names none of the store's own files, a size that is a whole number of bytes, and digests of
the right form (the LFS sha256 is later used to name a blob: it must be 64 hex digits). A
listing with anything else is refused whole, before a byte is written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath

from huggingface_hub.hf_api import RepoFile, RepoFolder

from edgeagent.errors import CorruptArtifactError
from edgeagent.store.snapshot import STORE_NAMES

COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
PART_SUFFIX = ".part"  # a download in progress, in staging
MAX_PATH_CHARS = 512
MAX_FILE_BYTES = 1 << 40


def check_commit(requested: str, commit: object) -> str:
    """The commit the hub named for `requested`: 40 hex digits, and the same commit if one
    was pinned."""
    if not isinstance(commit, str) or not COMMIT.match(commit):
        raise CorruptArtifactError(f"the hub named {commit!r} as the commit: not a 40-hex id")
    if COMMIT.match(requested) and commit != requested:
        raise CorruptArtifactError(
            f"pinned commit {requested} resolved to {commit} on the hub; refusing to fetch it"
        )
    return commit


def check_listing(entries: Iterable[RepoFile | RepoFolder]) -> list[RepoFile]:
    """The files of a listing, each checked; the listing is refused if any entry is wrong."""
    entries = list(entries)
    files = [entry for entry in entries if isinstance(entry, RepoFile)]
    paths = [check_path(file.path) for file in files]
    if len(set(paths)) != len(paths):
        raise CorruptArtifactError("the hub listed the same file twice")
    directories = {str(parent) for path in paths for parent in PurePosixPath(path).parents}
    if clash := sorted(directories & set(paths)):
        raise CorruptArtifactError(f"the hub listed {clash[0]!r} as both a file and a folder")
    for folder in (entry for entry in entries if isinstance(entry, RepoFolder)):
        if check_path(folder.path) not in directories:  # git has no empty folders
            raise CorruptArtifactError(
                f"the hub listed {folder.path!r} as a folder with no files in it (a symlink "
                f"or submodule?); refusing the listing"
            )
    for file in files:
        _check_file(file)
    return files


def check_path(path: object) -> str:
    """A listed path, if it is a plain relative path inside the repo; refused otherwise."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS:
        raise CorruptArtifactError(f"the hub listed a file with an unusable name: {path!r}")
    parts = PurePosixPath(path).parts
    problem = None
    if "\\" in path or "\0" in path or any(ord(c) < 32 for c in path):
        problem = "control characters or backslashes"
    elif path.startswith("/") or not parts:
        problem = "an absolute path"
    elif any(part in ("", ".", "..") for part in path.split("/")):
        problem = "'.' or '..' in it, or an empty part"
    elif any(part.startswith(".") for part in parts):
        problem = "a hidden name"
    elif path.endswith(PART_SUFFIX) or parts[-1] in STORE_NAMES:
        problem = "a name the store uses for its own files"
    if problem is not None:
        raise CorruptArtifactError(f"the hub listed {path!r}: {problem}; refusing the listing")
    return path


def _check_file(file: RepoFile) -> None:
    if not isinstance(file.size, int) or not 0 <= file.size <= MAX_FILE_BYTES:
        raise CorruptArtifactError(f"the hub listed {file.path!r} with size {file.size!r}")
    if file.lfs is not None:
        if not isinstance(file.lfs.sha256, str) or not SHA256.match(file.lfs.sha256):
            raise CorruptArtifactError(
                f"the hub listed {file.path!r} with LFS sha256 {file.lfs.sha256!r}: not 64 hex"
            )
    elif not isinstance(file.blob_id, str) or not COMMIT.match(file.blob_id):
        raise CorruptArtifactError(
            f"the hub listed {file.path!r} with blob id {file.blob_id!r}: not 40 hex"
        )
