"""Where updates come from: a drop directory watched with watchdog.

An operator or an OTA agent puts a model directory into the drop directory and, only when every
file is in place, creates an empty `READY` file in it (or renames a finished directory that
already holds `READY` into the drop directory). Nothing happens before that: partial files are
never looked at. A ready directory is handed to `on_ready` once, then moved to `done/` or
`failed/` (with a `REASON` file) by the caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from edgeagent.artifacts.manifest import ImportSource
from edgeagent.artifacts.store import ModelStore
from edgeagent.errors import EdgeAgentError
from edgeagent.updates.pipeline import Updater

logger = logging.getLogger(__name__)

MARKER = "READY"
FINISHED = ("done", "failed")


class DropDirectory:
    def __init__(
        self,
        path: Path,
        on_ready: Callable[[Path], Coroutine[Any, Any, None]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.path = path
        self._on_ready, self._loop = on_ready, loop
        self._seen: set[Path] = set()
        self._observer = Observer()

    def start(self) -> None:
        for name in FINISHED:
            (self.path / name).mkdir(parents=True, exist_ok=True)
        self._observer.schedule(_Handler(self), str(self.path), recursive=True)
        self._observer.start()
        for candidate in sorted(self.path.iterdir()):  # dropped while the daemon was down
            self.notice(candidate / MARKER)

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join()

    def notice(self, path: Path) -> None:
        """Called from watchdog's thread for every created or moved-in path."""
        candidate = path.parent if path.name == MARKER else path
        if candidate.parent != self.path or candidate.name in FINISHED:
            return
        if not (candidate / MARKER).is_file() or candidate in self._seen:
            return
        self._seen.add(candidate)
        logger.info("update dropped in %s", candidate)
        asyncio.run_coroutine_threadsafe(self._on_ready(candidate), self._loop)


class _Handler(FileSystemEventHandler):
    def __init__(self, drop: DropDirectory) -> None:
        self._drop = drop

    def on_created(self, event: FileSystemEvent) -> None:
        self._drop.notice(Path(str(event.src_path)))

    def on_moved(self, event: FileSystemEvent) -> None:
        self._drop.notice(Path(str(event.dest_path)))


def finish(candidate: Path, drop: Path, reason: str | None) -> Path:
    """Move a handled drop to done/ or failed/ (with its reason), so it is not taken again."""
    target = drop / ("failed" if reason else "done") / candidate.name
    if target.exists():
        target = target.with_name(f"{candidate.name}.{int(target.stat().st_mtime)}")
    candidate.rename(target)
    if reason:
        (target / "REASON").write_text(reason + "\n")
    return target


async def take_drop(candidate: Path, drop: Path, store: ModelStore, updater: Updater) -> None:
    """Import a ready drop into the store and update to it; file it under done/ or failed/."""
    (candidate / MARKER).unlink(missing_ok=True)  # ours now; not part of the model
    reason: str | None = None
    try:
        origin = ImportSource(origin=str(candidate))
        manifest = await asyncio.to_thread(store.import_directory, candidate, origin)
        outcome = await updater.update(manifest.version)
        if outcome.result != "promoted":
            reason = f"{outcome.result}: {outcome.reason}"
    except EdgeAgentError as error:
        reason = str(error)
    where = await asyncio.to_thread(finish, candidate, drop, reason)
    logger.info("drop %s handled: %s", where, reason or "promoted")
