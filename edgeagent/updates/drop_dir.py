"""The drop directory as an update source, watched with watchdog.

An operator or an OTA agent puts a model directory into the drop directory and, only when every
file is in place, creates an empty `READY` file in it (or renames a finished directory that
already holds `READY` into the drop directory). Nothing happens before that: partial files are
never looked at. A ready directory is claimed by renaming it into `taken/`, imported into the
store, updated to, and filed under `done/` or `failed/` (with a `REASON` file). A daemon killed
half-way finds it in `taken/` at its next start and handles it again (importing the same bytes
is the same version), so a drop is never lost.

Nothing in a drop is trusted: it is imported without following links and as its files were
when listed (`store/snapshot.py`), so a symlink, FIFO, device file, unreadable file or a
file still growing refuses it. Whatever refuses a drop files it under `failed/` with the
reason, in the log and in `edgeagent status`, and the next drop is taken as usual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from edgeagent.errors import EdgeAgentError
from edgeagent.failpoints import failpoint
from edgeagent.store.manifest import ImportSource
from edgeagent.store.store import ModelStore
from edgeagent.updates.pipeline import Updater

logger = logging.getLogger(__name__)

MARKER = "READY"
TAKEN, DONE, FAILED = "taken", "done", "failed"


class DropDirectory:
    """`run()` watches the directory and hands each claimed drop to `on_ready`, one at a time,
    until it is cancelled."""

    def __init__(self, path: Path, on_ready: Callable[[Path], Awaitable[None]]) -> None:
        self.path = path
        self._on_ready = on_ready

    def prepare(self) -> None:
        """Make the directory and its folders (before the daemon says it serves: whoever drops
        or links a version in then finds the directory there)."""
        for name in (TAKEN, DONE, FAILED):
            (self.path / name).mkdir(parents=True, exist_ok=True)

    async def run(self) -> None:
        await asyncio.to_thread(self.prepare)
        loop, noticed = asyncio.get_running_loop(), asyncio.Queue[Path]()
        notice = _Handler(lambda path: loop.call_soon_threadsafe(noticed.put_nowait, path))
        observer = Observer()
        observer.schedule(notice, str(self.path), recursive=True)
        observer.start()
        try:
            for interrupted in sorted((self.path / TAKEN).iterdir()):  # a daemon died handling it
                await self._on_ready(interrupted)
            for candidate in sorted(self.path.iterdir()):  # dropped while the daemon was down
                noticed.put_nowait(candidate / MARKER)
            while True:
                claimed = await asyncio.to_thread(self._claim, await noticed.get())
                if claimed is not None:
                    await self._on_ready(claimed)
        finally:
            observer.stop()
            await asyncio.to_thread(observer.join)

    def _claim(self, path: Path) -> Path | None:
        """A ready drop moved into taken/ (ours from now on), or None if `path` is not one."""
        candidate = path.parent if path.name == MARKER else path
        if candidate.parent != self.path or candidate.name in (TAKEN, DONE, FAILED):
            return None
        if not (candidate / MARKER).is_file():
            return None
        claimed = _unused(self.path / TAKEN / candidate.name)
        try:
            candidate.rename(claimed)
        except FileNotFoundError:  # claimed already, on an earlier event for the same drop
            return None
        (claimed / MARKER).unlink(missing_ok=True)  # not part of the model
        logger.info("update dropped in %s", candidate)
        return claimed


class _Handler(FileSystemEventHandler):
    def __init__(self, notice: Callable[[Path], object]) -> None:
        self._notice = notice

    def on_created(self, event: FileSystemEvent) -> None:
        self._notice(Path(str(event.src_path)))

    def on_moved(self, event: FileSystemEvent) -> None:
        self._notice(Path(str(event.dest_path)))


def _unused(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`...: a drop of the same name as an earlier one (renamed in
    twice) is kept apart from it."""
    candidate, number = path, 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def finish(claimed: Path, drop: Path, reason: str | None) -> Path:
    """Move a handled drop to done/ or failed/ (with its reason), so it is not taken again.
    The reason is written before the move: whoever sees the drop in failed/ finds it there."""
    target = _unused(drop / (FAILED if reason else DONE) / claimed.name)
    if reason:
        (claimed / "REASON").write_text(reason + "\n")
    claimed.rename(target)
    return target


async def take_drop(claimed: Path, drop: Path, store: ModelStore, updater: Updater) -> None:
    """Import a claimed drop into the store and update to it; file it under done/ or failed/.
    Whatever goes wrong with this drop stays with it: it never stops the next one."""
    reason: str | None = None
    try:
        origin = ImportSource(origin=str(drop / claimed.name))
        manifest = await asyncio.to_thread(
            store.import_directory, claimed, origin, follow_links=False
        )
        failpoint("drop.imported")
        outcome = await updater.update(manifest.version)
        if outcome.result != "promoted":
            reason = f"{outcome.result}: {outcome.reason}"
    except EdgeAgentError as error:
        reason = str(error)
        updater.note_refused("drop", claimed.name, reason)
    except Exception as error:  # a bug or an OS error: this drop fails, the watcher goes on
        logger.exception("drop %s could not be handled", claimed)
        reason = f"unexpected error: {error!r}"
        updater.note_refused("drop", claimed.name, reason)
    where = await asyncio.to_thread(finish, claimed, drop, reason)
    log = logger.warning if reason else logger.info
    log("drop %s handled: %s", where, reason or "promoted")
