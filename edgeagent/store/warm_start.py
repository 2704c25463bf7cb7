"""Starting warm from a version's stored compile cache, and storing the cache an engine made.

The daemon wraps its engine factory (`WarmStart.wrap`): before an engine starts on a stored
version, the key of that start (`compile_key.engine_key`) names the box's compile folder,
`CACHE_DIR/compile/<keyid>`, which vLLM and Inductor are pointed at; when the folder is empty
and the version carries a cache of that key, the cache is checked and copied in first. A cache
of another key is left, with the fields that differ in the log. Nothing here fails a start.

Once an engine serves (started and smoke-tested: it is in the slot), `export_loop` copies its
key's folder into the version it serves, when the version has no cache of that key yet: on a
thread at the lowest CPU priority, off the event loop, cancelled and awaited at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from edgeagent.errors import CorruptArtifactError, InsufficientDiskError, StoppedError
from edgeagent.store import compile_cache
from edgeagent.store.compile_key import BoxFacts, CompileKey, engine_key, probe_box
from edgeagent.store.store import ModelStore
from edgeagent.timeline import record_step

logger = logging.getLogger(__name__)

E = TypeVar("E")
Serving = tuple[object, str]  # an engine and the version it serves
EXPORT_POLL_S = 5.0  # the slot is looked at on every change, and at least this often


class _Config(Protocol):
    @property
    def model_path(self) -> Path: ...


C = TypeVar("C", bound=_Config)


@dataclass(frozen=True)
class Started:
    """What an engine was started with, as far as its compile cache goes."""

    version: str
    key: CompileKey
    box_dir: Path
    imported: bool
    placed: frozenset[str] = frozenset()  # the files an import put in box_dir


class WarmStart:
    def __init__(
        self, store: ModelStore, cache_dir: Path, box: Callable[[], BoxFacts] = probe_box
    ) -> None:
        self._store = store
        self._root = cache_dir / compile_cache.BOX_FOLDER
        self._probe = box
        self._box: BoxFacts | None = None
        self._started: dict[int, tuple[weakref.ref[Any], Started]] = {}
        self._exported: set[tuple[str, str]] = set()
        self.exports = 0  # caches stored by this daemon (for tests and status)

    # -- before and after a start ----------------------------------------------------------

    def wrap(self, factory: Callable[[C], E]) -> Callable[[C], E]:
        """`factory`, with the compile cache prepared before each start and noted after."""

        def start(config: C) -> E:
            started = self.prepare(config)
            engine = factory(config)
            if started is not None:
                self.note_started(engine, started)
            return engine

        return start

    def prepare(self, config: _Config) -> Started | None:
        """Import the version's cache if the box has none of this key; point vLLM and Inductor
        at the key's folder. None (and nothing changed) for a model outside the store."""
        version = self._store.version_at(config.model_path)
        if version is None:
            return None
        try:
            manifest = self._store.manifest(version)
        except CorruptArtifactError:
            return None
        settings: dict[str, Any] = {}
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            settings = dataclasses.asdict(config)
        key = engine_key(self.box, manifest, settings, config.model_path)
        box_dir = self._root / key.keyid
        imported = False
        if compile_cache.box_files(box_dir):
            logger.info("compile cache for %s: this box's own (key %s)", version, key)
        else:
            imported = self._import(version, key, box_dir)
        os.environ["VLLM_CACHE_ROOT"] = str(box_dir / "vllm")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(box_dir / "inductor")
        placed = frozenset(compile_cache.box_files(box_dir)) if imported else frozenset()
        return Started(version, key, box_dir, imported, placed)

    @property
    def box(self) -> BoxFacts:
        if self._box is None:
            self._box = self._probe()
        return self._box

    def _import(self, version: str, key: CompileKey, box_dir: Path) -> bool:
        reasons = []
        for bundle in compile_cache.stored_caches(self._store.versions / version):
            try:
                manifest = compile_cache.read_manifest(bundle)
                if bundle.name != key.keyid:
                    reasons.append("; ".join(key.differences(manifest.compile_key)))
                    continue
                started = time.perf_counter()
                compile_cache.verify(bundle, manifest)
                compile_cache.place(bundle, manifest, box_dir)
            except (CorruptArtifactError, OSError) as error:
                logger.warning("compile cache for %s: not used: %s (%s); removed, the engine "
                               "compiles", version, error, bundle.name)  # fmt: skip
                compile_cache.remove(bundle)
                continue
            logger.info("compile cache for %s: imported (key %s, %d files, %.1f MiB, %.2f s)",
                        version, key, len(manifest.files), manifest.total_bytes / (1 << 20),
                        time.perf_counter() - started)  # fmt: skip
            record_step("daemon: compile cache imported")
            return True
        for reason in reasons:
            logger.info("compile cache for %s: not used: %s; the engine compiles", version, reason)
        if not reasons:
            logger.info("compile cache for %s: none stored for key %s; the engine compiles",
                        version, key)  # fmt: skip
        return False

    def note_started(self, engine: object, started: Started) -> None:
        """Remember what `engine` was started with, for the export; say whether an imported
        cache served (the engine then wrote no compiled file of its own)."""
        if started.imported:
            added = compile_cache.box_files(started.box_dir) - started.placed
            if added:
                logger.warning(
                    "compile cache for %s: imported, but the engine compiled %d more files: "
                    "its own cache keys differ from this box's (another install path?)",
                    started.version, len(added),
                )  # fmt: skip
            else:
                logger.info("compile cache for %s: the engine compiled nothing new",
                            started.version)  # fmt: skip
        try:
            self._started[id(engine)] = (weakref.ref(engine), started)
        except TypeError:  # an engine that cannot be referred to weakly: no export for it
            logger.debug("compile cache: %r is not weakly referable", engine)

    # -- the export ------------------------------------------------------------------------

    async def export_loop(
        self,
        serving: Callable[[], tuple[object, str] | None],
        changed: Callable[[], Awaitable[None]],
    ) -> None:
        """For ever: export the cache of what serves (engine, version) when it has none."""
        while True:
            now = serving()
            if now is not None:
                await self.export_serving(*now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXPORT_POLL_S):
                    await changed()

    async def export_serving(self, engine: object, version: str) -> None:
        entry = self._started.get(id(engine))
        if entry is None or entry[0]() is not engine:
            return
        started = entry[1]
        done = (version, started.key.keyid)
        if done in self._exported:
            return
        self._exported.add(done)
        cancel = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(self.export, started, version, cancel))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            cancel.set()
            await asyncio.gather(work, return_exceptions=True)
            raise

    def export(self, started: Started, version: str, cancel: threading.Event | None = None) -> bool:
        """Store the box's cache for `started`'s key beside `version`, if absent (blocking)."""
        with contextlib.suppress(OSError):  # this thread only: the copy yields to serving
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        target = self._store.versions / version / compile_cache.CACHE_FOLDER / started.key.keyid
        if target.exists():
            return False
        begun = time.perf_counter()
        try:
            size = sum(p.stat().st_size for p in started.box_dir.rglob("*") if p.is_file())
            self._store.ensure_free(size, f"storing the compile cache of {version}")
            with self._store.staging() as scratch:
                built = compile_cache.build_bundle(started.box_dir, started.key, started.version,
                                                   scratch, cancel)  # fmt: skip
                if built is None:
                    logger.debug("compile cache for %s: nothing compiled to store", version)
                    return False
                with self._store.locked():
                    stored = compile_cache.install(built[0], self._store.versions / version)
        except (StoppedError, InsufficientDiskError, OSError) as error:
            logger.warning("compile cache for %s: not stored (%s)", version, error)
            return False
        if stored:
            self.exports += 1
            manifest = built[1]
            logger.info("compile cache for %s: stored (key %s, %d files, %.1f MiB, %.1f s)",
                        version, started.key, len(manifest.files),
                        manifest.total_bytes / (1 << 20), time.perf_counter() - begun)  # fmt: skip
        return stored
