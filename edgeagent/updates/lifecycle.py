"""The one owner of which version serves: the start, every update and rollback, engine death.

A start is an update from nothing, through the same steps: verify (as `store.verify_on_start`
says) → fit → place (from nothing: a new engine) → load → smoke test → install in the slot;
the quality gate does not apply (there is no serving version to compare with). Its failure
branch is the fallback: `current`, else `previous` (never one marked bad), else
NoServableVersionError naming every reason. The store's `current` does not move at start: a
`current` that failed transiently is tried again at the next start. Once serving, updates and
rollbacks go through the Updater (updates/pipeline.py), and the main loop's tick comes here to
end a probation and to notice an engine that died or a slot left empty. The table of every
failure, at start and during an update, is in docs/update-failures.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from edgeagent.engine.loader import EngineLoader, LoadTimings
from edgeagent.engine.placement import require_fit
from edgeagent.engine.slot import Serving, ServingSlot
from edgeagent.errors import (
    CorruptArtifactError,
    EdgeAgentError,
    EngineError,
    LoadError,
    NoServableVersionError,
    NotFoundError,
)
from edgeagent.eval_set import configured_file
from edgeagent.settings import Settings
from edgeagent.store.manifest import Manifest
from edgeagent.store.store import ModelStore
from edgeagent.timeline import StartTimeline
from edgeagent.updates.gate import QualityGate
from edgeagent.updates.journal import UpdateJournal, UpdateOutcome
from edgeagent.updates.pipeline import Probation, Updater
from edgeagent.updates.recovery import ResumedProbation, settle_interrupted

logger = logging.getLogger(__name__)

T = TypeVar("T")


class OffLoop(Protocol):
    """Blocking work run on a thread, given up on when the daemon is asked to stop."""

    def __call__(self, work: Callable[[], T]) -> Awaitable[T]: ...


class Lifecycle:
    def __init__(
        self, settings: Settings, store: ModelStore, loader: EngineLoader, slot: ServingSlot, *,
        timeline: StartTimeline, off_loop: OffLoop, cancel: threading.Event,
        status: Callable[[str], None], on_outcome: Callable[[UpdateOutcome], None],
    ) -> None:  # fmt: skip
        self._settings, self._store, self._loader, self._slot = settings, store, loader, slot
        self._timeline, self._off_loop, self._cancel = timeline, off_loop, cancel
        self._status = status
        self.journal = UpdateJournal(settings.state_dir / "updates.json")
        updates = settings.updates
        eval_file = configured_file(updates.eval_set) if updates.eval_set else None
        self.updater = Updater(
            store, loader, slot, self.journal, hold_s=updates.hold_s,
            probation_s=updates.probation_s, on_outcome=on_outcome,
            gate=QualityGate(enabled=updates.quality_gate,
                             max_perplexity_ratio=updates.max_perplexity_ratio,
                             min_top1_agreement=updates.min_top1_agreement,
                             eval_file=eval_file, bounds=loader.bounds),
        )  # fmt: skip
        self._resumed: ResumedProbation | None = None
        self._hash_after_start: str | None = None  # trusted at start, to be hashed once serving
        self._next_health_check: float | None = None  # from the first tick

    def settle_interrupted(self) -> None:
        """Settle a change the last daemon did not finish, before anything is loaded."""
        self._resumed = settle_interrupted(self.journal, self._store)

    async def start(self) -> Serving:
        """Serve `current`, else `previous`: the first that verifies, fits and passes its smoke
        test (a version marked bad is not fallen back to)."""
        failures = []
        for ref in ("current", "previous"):
            try:
                manifest = await self._off_loop(lambda: self._verify_for_start(ref))  # noqa: B023
                if ref == "previous" and manifest.version in self.journal.bad:
                    raise LoadError(f"marked bad: {self.journal.bad[manifest.version]}")
                serving = await self._load(manifest)
            except (CorruptArtifactError, NotFoundError, LoadError) as error:
                failures.append(f"{ref}: {error}")
                logger.error("cannot serve the %s version: %s", ref, error)
                continue
            self.updater.probation = self._resumed_probation(serving)
            return serving
        raise NoServableVersionError(
            "no servable version: " + "; ".join(failures) + ". Fetch or build one that fits "
            "(`edgeagent fetch`, `edgeagent fit`), then `edgeagent models verify`"
        )

    def _verify_for_start(self, ref: str) -> Manifest:
        """`ref`'s manifest once its files check out as `store.verify_on_start` says; a version
        whose files are as they were when last hashed is hashed again after serving starts."""
        mode, store = self._settings.store.verify_on_start, self._store
        if mode == "recorded" and (manifest := store.verified_unchanged(ref)) is not None:
            self._hash_after_start = manifest.version
            self._timeline.mark(f"verification (files as recorded when hashed, {ref})")
            return manifest
        manifest = store.verify(ref, full=mode != "size", cancel=self._cancel)
        self._hash_after_start = None
        self._timeline.mark(f"verification ({'sizes' if mode == 'size' else 'sha256'}, {ref})")
        return manifest

    async def _load(self, manifest: Manifest) -> Serving:
        loader = self._loader
        fit = loader.plan(manifest)
        self._timeline.mark("fit check")
        require_fit(manifest, fit)
        logger.info(
            "model %s version %s (%s, %s), context %d tokens, %d sequences at full context%s",
            manifest.model_id, manifest.version, manifest.source_label,
            manifest.quantization_label, fit.max_model_len, fit.max_concurrency,
            "".join(f"; {n}" for n in fit.notes),
        )  # fmt: skip
        self._status(f"starting the engine on {manifest.version}")
        timings = LoadTimings()
        # The first start is bounded by systemd's start limit, not the loader's (a cold compile).
        serving = await self._slot.swap(
            lambda _: loader.start(manifest, fit, timings, bounded=False), hold_s=0
        )
        assert serving is not None
        self._timeline.split(
            "engine start (vLLM: weights, compile, CUDA graphs, KV cache)", timings.load_s,
            "warm-up (smoke test)",
        )  # fmt: skip
        return serving

    def _resumed_probation(self, serving: Serving) -> Probation | None:
        """The probation an orderly shutdown interrupted, if that version is what serves again."""
        resumed = self._resumed
        if resumed is None or resumed.version != serving.version:
            return None
        now = time.monotonic()
        return Probation(resumed.version, self._store.manifest(resumed.fallback),
                         now - resumed.promoted_s_ago, now + resumed.left_s)  # fmt: skip

    def check_after_start(self) -> Callable[[], Awaitable[None]] | None:
        """The full check a start skipped (it trusted files as recorded), to run once serving."""
        version = self._hash_after_start
        if version is None:
            return None
        return lambda: self._hash_serving_version(version)

    async def _hash_serving_version(self, version: str) -> None:
        """A version that fails the full check after the start is rolled back from."""
        store = self._store
        try:
            await self._off_loop(lambda: store.verify(version, full=True, cancel=self._cancel))
        except CorruptArtifactError as error:
            logger.error("the serving version failed its check after the start: %s; rolling "
                         "back to the previous version", error)  # fmt: skip
            if self.updater.serving_version == version:
                try:
                    await self.updater.rollback()
                except EdgeAgentError as failed:
                    logger.error("cannot roll back (%s); %s keeps serving what it loaded "
                                 "before the check", failed, version)  # fmt: skip
            return
        logger.info("version %s passed its full check (sha256 of every file) after the start",
                    version)  # fmt: skip

    def describe(self) -> str:
        """What serves, or why nothing does, or the update under way: for systemd's STATUS=."""
        serving, candidate = self._slot.serving, self.updater.candidate
        if serving is None:
            return f"not serving: {self._slot.why_empty}"
        if candidate:
            return f"updating to {candidate}; serving {serving.version}"
        return f"serving {serving.model_id} {serving.version}"

    async def tick(self) -> str | None:
        """The main loop's tick: end a probation whose time is up, and check the engine every
        `model.health_check_s`. Why the daemon must stop (nothing can serve), else None."""
        updater, every_s, now = self.updater, self._settings.model.health_check_s, time.monotonic()
        if self._next_health_check is None:
            self._next_health_check = now + every_s
        updater.check_probation()
        if self._slot.serving is None and not updater.busy:
            return self._slot.why_empty
        if now >= self._next_health_check:
            self._next_health_check = time.monotonic() + every_s
            return await self._engine_death()
        return None

    async def _engine_death(self) -> str | None:
        """None while the engine answers, or once an update in probation has been rolled back;
        else why nothing serves."""
        serving = self._slot.serving
        # An update watches the engines it drives itself: each step it awaits on one is
        # bounded and polls the engine's health (engine/bounds.py).
        if self.updater.busy or serving is None:
            return None
        try:
            await serving.engine.check_health()
        except EngineError as died:
            try:
                if await self.updater.engine_died(str(died)) is not None:
                    return None
            except EdgeAgentError:  # the fallback failed too
                logger.exception("the automatic rollback failed")
            return f"the engine died ({died})"
        return None

    async def close(self) -> None:
        """Take no more changes; wait for the one under way (a change is never stopped half-way)."""
        await self.updater.close()

    async def unload(self) -> None:
        """Stop the serving engine, and note an orderly stop (a probation resumes from it)."""
        if self._slot.serving is not None:
            await self._slot.swap(self._release, hold_s=None)
        self.journal.stopped_cleanly()

    async def _release(self, serving: Serving | None) -> None:
        if serving is not None:
            await self._loader.stop(serving)
