"""Copying a model directory that may be hostile or still being written (a drop, an import).

Only regular files and directories are taken. A FIFO, socket or device file anywhere refuses
the whole directory, and is never opened (opening a FIFO would block); so does a symlink when
links are not trusted (a drop: a link could point anywhere on the box). Hidden entries (`.cache`,
`.gitattributes`) are skipped unread, and a file named like the store's own refuses the
directory. Each file is copied as it was when the directory was listed: at most that many
bytes, and if it changed meanwhile (still being written) the directory is refused, so a file
that keeps growing costs one read of its listed size, never a stuck import.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from edgeagent.errors import CorruptArtifactError

logger = logging.getLogger(__name__)

CHUNK = 4 << 20
MAX_DEPTH = 16
STORE_NAMES = frozenset({"manifest.json", "refs.json", ".lock"})  # the store's own files


@dataclass(frozen=True)
class Member:
    relative: str
    status: os.stat_result


def list_members(
    root: Path, *, follow_links: bool, skip: frozenset[str] = frozenset()
) -> list[Member]:
    """The regular files under `root`, as they are now; refused if anything else is there.
    `skip`: names at the top that are not the model's (its compile cache, taken apart)."""
    if root.is_symlink() and not follow_links:
        raise CorruptArtifactError(f"{root} is a symbolic link; refused")
    members: list[Member] = []
    _walk(root, "", follow_links, members, depth=0, skip=skip)
    return sorted(members, key=lambda m: m.relative)


def copy_member(root: Path, member: Member, target: Path, *, follow_links: bool) -> None:
    """Copy one listed file, exactly as listed; refused if it changed since."""
    source = root / member.relative
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(source, flags)
    except OSError as error:
        raise CorruptArtifactError(f"cannot read {source}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as file, target.open("wb") as out:
        opened = os.fstat(file.fileno())
        if not stat.S_ISREG(opened.st_mode) or _identity(opened) != _identity(member.status):
            raise CorruptArtifactError(f"{source} was replaced while it was imported; refused")
        left = member.status.st_size
        while left and (chunk := file.read(min(CHUNK, left))):
            out.write(chunk)
            left -= len(chunk)
        after = os.fstat(file.fileno())
    if left or _changed(member.status, after):
        raise CorruptArtifactError(
            f"{source} changed while it was imported (still being written?); refused"
        )


def _walk(
    directory: Path, prefix: str, follow: bool, members: list[Member], depth: int,
    skip: frozenset[str] = frozenset(),
) -> None:  # fmt: skip
    if depth > MAX_DEPTH:
        raise CorruptArtifactError(f"{directory}: nested more than {MAX_DEPTH} levels; refused")
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as error:
        raise CorruptArtifactError(f"cannot list {directory}: {error.strerror}") from None
    for entry in entries:
        relative = f"{prefix}{entry.name}"
        if depth == 0 and entry.name in skip:
            continue
        if entry.name.startswith("."):
            logger.info("skipping hidden %s in %s", relative, directory)
            continue
        if entry.is_symlink() and not follow:
            raise CorruptArtifactError(f"{entry.path} is a symbolic link; refused")
        if entry.name in STORE_NAMES:
            raise CorruptArtifactError(f"{entry.path} is named like the store's own files")
        try:
            status = entry.stat(follow_symlinks=follow)
        except OSError as error:
            raise CorruptArtifactError(f"cannot read {entry.path}: {error.strerror}") from None
        if stat.S_ISDIR(status.st_mode):
            _walk(Path(entry.path), f"{relative}/", follow, members, depth + 1)
        elif stat.S_ISREG(status.st_mode):
            members.append(Member(relative, status))
        else:
            raise CorruptArtifactError(
                f"{entry.path} is a {_kind(status.st_mode)}, not a file; refused"
            )


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"
