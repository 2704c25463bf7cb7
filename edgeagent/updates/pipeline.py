"""An update: verify → fit → hold new requests → load → smoke test → promote, or put back.

Where the fit check says the candidate fits beside the serving engine (on a GPU, or wherever
`updates.swap = "beside"`), its engine is started and checked while the old one serves, and the
slot switches to it without holding any request; the old engine stops once its requests are
done. Otherwise, with the same architecture and quantization layout the weights are reloaded
in place in the running engine; with another layout the engine is stopped and started on the
candidate. Those two go through the serving slot's swap: new requests wait (they are not
refused), requests under way finish first, and what serves afterwards is whatever the change
installed: the candidate, or the old version put back. A candidate that fails is marked bad, so
it is not retried in a loop. After a promotion the old version stays the fallback for a
probation window: if the engine dies within it, the engine is restarted on the old version.

Every step is written to the journal before it is taken, so a daemon killed anywhere settles
the update at its next start (`updates/recovery.py`). The table of every failure and what
follows it is in docs/update-failures.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from edgeagent.engine.loader import EngineLoader, LoadTimings
from edgeagent.engine.slot import Serving, ServingSlot
from edgeagent.errors import (
    CorruptArtifactError,
    EngineDeadError,
    LoadError,
    UnavailableError,
    UpdateRefusedError,
)
from edgeagent.failpoints import failpoint
from edgeagent.store.manifest import Manifest
from edgeagent.store.store import ModelStore
from edgeagent.updates.gate import QualityGate, Reference
from edgeagent.updates.journal import Kind, Method, UpdateJournal, UpdateOutcome

logger = logging.getLogger(__name__)

RETIRE_ABORT_S = 5.0  # for aborted requests to leave the old engine before it stops

T = TypeVar("T")


@dataclass(frozen=True)
class Probation:
    version: str  # the promoted version on trial
    fallback: Manifest
    promoted_at: float  # time.monotonic()
    until: float


class Updater:
    def __init__(
        self,
        store: ModelStore,
        loader: EngineLoader,
        slot: ServingSlot,
        journal: UpdateJournal,
        *,
        hold_s: float = 30.0,
        probation_s: float = 300.0,
        probation: Probation | None = None,
        on_outcome: Callable[[UpdateOutcome], None] = lambda outcome: None,
        gate: QualityGate | None = None,
    ) -> None:
        self._store, self._loader, self._slot = store, loader, slot
        self.journal = journal
        self._hold_s, self._probation_s = hold_s, probation_s
        self._on_outcome = on_outcome
        self._lock = asyncio.Lock()
        self._running: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.candidate: str | None = None
        self.probation = probation
        self._gate = gate or QualityGate(enabled=False)

    @property
    def gate(self) -> QualityGate:
        return self._gate

    @property
    def serving_version(self) -> str | None:
        serving = self._slot.serving
        return serving.version if serving is not None else None

    @property
    def previous_version(self) -> str | None:
        return self._store.refs().previous

    @property
    def busy(self) -> bool:
        """An update, rollback or automatic rollback is under way."""
        return self._lock.locked()

    @property
    def probation_left_s(self) -> float:
        """Seconds left in which an engine death rolls the last promotion back; 0 if none."""
        if self.probation is None:
            return 0.0
        return max(0.0, self.probation.until - time.monotonic())

    def in_probation(self) -> bool:
        return self.probation_left_s > 0

    async def update(self, version: str) -> UpdateOutcome:
        return await self._exclusive(lambda: self._apply(version, "update"))

    async def rollback(self) -> UpdateOutcome:
        async def to_previous() -> UpdateOutcome:
            previous = self._store.refs().previous
            if previous is None:
                raise UpdateRefusedError("the store has no previous version to roll back to")
            return await self._apply(previous, "rollback")

        return await self._exclusive(to_previous)

    async def engine_died(self, reason: str) -> UpdateOutcome | None:
        """The engine died: within a probation window, serve the fallback again (the new version
        is marked bad) and return what happened; None when there is nothing to fall back to.
        Raises EngineDeadError when the fallback cannot be started either."""
        if not self.in_probation():
            return None
        return await self._exclusive(lambda: self._fall_back(reason))

    def note_refused(self, kind: Kind, name: str, reason: str) -> None:
        """A drop or a hub fetch refused before it became an update (not a model, unsafe,
        unreadable, untrusted): in the history, so `edgeagent status` shows it."""
        outcome = UpdateOutcome(kind, name, self.serving_version or "", "refused", reason)
        self._record(outcome)

    def check_probation(self) -> None:
        """End a probation whose time is up (called from the daemon's main loop)."""
        if self.probation is not None and not self.in_probation() and not self.busy:
            logger.info("%s passed its probation", self.probation.version)
            self.probation = None
            self.journal.end_probation()

    async def close(self) -> None:
        """Take no more changes and wait for the one under way to finish (shutdown: a change is
        never stopped half-way)."""
        self._closed = True
        await asyncio.gather(*self._running, return_exceptions=True)

    async def _exclusive(self, work: Callable[[], Awaitable[T]]) -> T:
        """One change at a time, run to its end: a caller that goes away (a client hanging up,
        a source task cancelled at shutdown) does not stop it half-way."""
        if self._closed:
            raise UnavailableError("the daemon is shutting down; no more model changes")

        async def locked() -> T:
            async with self._lock:
                return await work()

        task = asyncio.create_task(locked(), name="model-change")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(_settled)
        return await asyncio.shield(task)

    async def _apply(self, version: str, kind: Kind) -> UpdateOutcome:
        serving = self._slot.current()
        resolved = self._store.resolve(version)
        outcome = UpdateOutcome(kind, resolved, serving.version, "refused")
        self.candidate = resolved
        bad: tuple[str, str] | None = None
        try:
            self._check_not_refused(resolved, serving)
            self.journal.begin(kind, resolved, serving.version)
            failpoint("update.staged")
            started = time.perf_counter()
            candidate = await asyncio.to_thread(self._store.verify, resolved)
            outcome = replace(outcome, verify_s=time.perf_counter() - started)
            self.journal.advance("verified")
            failpoint("update.verified")
            method: Method = self._loader.place(candidate, serving)
            reference = await self._gate_reference(kind, serving, candidate)
            return await self._swap(candidate, serving, outcome, method, reference)
        except (UpdateRefusedError, CorruptArtifactError, UnavailableError, LoadError) as error:
            if isinstance(error, CorruptArtifactError):
                bad = (resolved, str(error))
            return self._record(replace(outcome, reason=str(error)), bad=bad)
        finally:
            self.candidate = None

    def _check_not_refused(self, version: str, serving: Serving) -> None:
        if version == serving.version:
            raise UpdateRefusedError(f"version {version} is already serving")
        if version in self.journal.bad:
            raise UpdateRefusedError(f"marked bad earlier: {self.journal.bad[version]}")

    def next_swap(self) -> str:
        """How an update to a version of the serving one's size would load now, and why."""
        serving = self._slot.serving
        if serving is None:
            return ""
        beside, why = self._loader.beside(serving.manifest, serving)
        if beside:
            return f"beside: {why}"
        staging, how = self._loader.staging(serving)
        return f"in place: {why}; {how if staging else 'reloaded from disk: ' + how}"

    async def _gate_reference(
        self, kind: Kind, serving: Serving, candidate: Manifest
    ) -> Reference | None:
        """The serving version's scores on the candidate's eval set, taken before the pause;
        None when the gate does not apply (it is off, or an operator asked for a rollback)."""
        if not self._gate.enabled or kind != "update":
            return None
        model_dir = self._store.model_dir(candidate.version)
        return await self._gate.reference(serving, candidate, model_dir)

    async def _swap(
        self, candidate: Manifest, old: Serving, outcome: UpdateOutcome, method: Method,
        reference: Reference | None = None,
    ) -> UpdateOutcome:  # fmt: skip
        if method == "beside":
            return await self._swap_beside(candidate, old, outcome, reference)
        timings, problem = LoadTimings(), list[str]()

        async def change(serving: Serving | None) -> Serving:
            assert serving is old  # the slot only changes under this updater's lock
            self.journal.advance("loading")
            failpoint("update.loading")
            try:
                return await self._bring_in(candidate, old, method, timings, reference)
            except LoadError as error:
                logger.error("%s of %s failed: %s", method, candidate.version, error)
                problem.append(str(error))
                answers = method != "reload" or await self._loader.still_answers(old, error)
                return await self._put_back(old, method, engine_answers=answers)

        staged = method == "reload" and await self._staged(candidate, old)
        paused = time.perf_counter()
        outcome = replace(outcome, method="copy" if staged else method)
        try:
            installed = await self._slot.swap(change, self._hold_s)
        except EngineDeadError as dead:
            why = f"{problem[0] if problem else 'loading failed'}; {dead}"
            self._record(replace(outcome, result="failed", reason=f"{why}; nothing serves: "
                                 "the daemon exits to be restarted"),
                         bad=(candidate.version, why))  # fmt: skip
            raise
        outcome = replace(outcome, pause_s=time.perf_counter() - paused,
                          reload_s=timings.load_s, smoke_s=timings.smoke_s,
                          gate_s=timings.gate_s)  # fmt: skip
        if problem:
            return self._record(replace(outcome, result="rolled_back", reason=problem[0]),
                                bad=(candidate.version, problem[0]))  # fmt: skip
        assert installed is not None
        assert installed.version == candidate.version
        return self._promote(installed, old, outcome)

    async def _staged(self, candidate: Manifest, old: Serving) -> bool:
        """Stage the candidate and the serving weights in host memory before the pause, where
        the host has room: the pause is then one copy, and so is putting the old back."""
        not_staged = await self._loader.stage(candidate, old)
        if not_staged is not None:
            logger.info("%s loads from disk inside the pause: %s", candidate.version, not_staged)
        return not_staged is None

    async def _bring_in(
        self, candidate: Manifest, old: Serving, method: Method, timings: LoadTimings,
        reference: Reference | None,
    ) -> Serving:  # fmt: skip
        if method == "reload":
            installed = await self._loader.reload(old, candidate, timings)
        else:
            installed = await self._loader.restart(old, candidate, timings)
        await self._check_quality(
            installed, reference, timings, stop_on_failure=method == "restart"
        )
        return installed

    async def _check_quality(
        self, installed: Serving, reference: Reference | None, timings: LoadTimings, *,
        stop_on_failure: bool,
    ) -> None:  # fmt: skip
        """The quality gate, where it applies (its time in `timings`); a refused candidate with
        its own engine has that engine stopped before the error propagates."""
        if reference is None:
            return
        started = time.perf_counter()
        try:
            await self._gate.check(installed.engine, installed.version, reference)
        except LoadError:
            if stop_on_failure:
                await self._loader.stop(installed)
            raise
        finally:
            timings.gate_s = time.perf_counter() - started

    async def _swap_beside(
        self, candidate: Manifest, old: Serving, outcome: UpdateOutcome,
        reference: Reference | None,
    ) -> UpdateOutcome:  # fmt: skip
        """Start and check the candidate's engine while the old one serves, switch without
        holding any request, then stop the old engine once its requests are done."""
        timings = LoadTimings()
        outcome = replace(outcome, method="beside")
        self.journal.advance("loading")
        failpoint("update.loading")
        try:
            fit = self._loader.plan(candidate, beside=old)
            installed = await self._loader.start(candidate, fit, timings)
            await self._check_quality(installed, reference, timings, stop_on_failure=True)
        except LoadError as error:
            logger.error("beside %s, %s failed: %s", old.version, candidate.version, error)
            failed = replace(outcome, result="rolled_back", reason=str(error),
                             reload_s=timings.load_s, smoke_s=timings.smoke_s,
                          gate_s=timings.gate_s)  # fmt: skip
            return self._record(failed, bad=(candidate.version, str(error)))
        switched = time.perf_counter()
        await self._slot.switch(installed)
        outcome = replace(outcome, pause_s=time.perf_counter() - switched,
                          reload_s=timings.load_s, smoke_s=timings.smoke_s,
                          gate_s=timings.gate_s)  # fmt: skip
        promoted = self._promote(installed, old, outcome)
        await self._retire(old, installed.version)
        return promoted

    async def _retire(self, old: Serving, successor: str) -> None:
        """Stop `old`'s engine once the requests it answers are done; those still running
        after `hold_s` are ended with the reason, as a drain past its grace ends them."""
        if not await self._slot.wait_released(old, self._hold_s):
            reason = (f"{old.version} was replaced by {successor} and this request ran past "
                      f"the {self._hold_s:g} s given to finish on it")  # fmt: skip
            await self._slot.cancel(reason, on=old)
            await self._slot.wait_released(old, RETIRE_ABORT_S)
        await self._loader.stop(old)

    async def _put_back(self, old: Serving, method: Method, *, engine_answers: bool) -> Serving:
        """Serve `old` again, as it was: its weights reloaded into its engine, or, where a
        restart stopped that engine or a reload left it no longer answering (hung or dead), on
        a fresh engine. If even that fails nothing can be served."""
        try:
            if method == "reload" and engine_answers:
                return await self._loader.reload(old, old.manifest)
            if method == "reload":
                logger.error("the engine no longer answers: stopping it and starting %s on a "
                             "fresh engine", old.version)  # fmt: skip
                await self._loader.stop(old)
            return await self._loader.start(old.manifest, self._loader.plan(old.manifest))
        except LoadError as error:
            raise EngineDeadError(f"could not put {old.version} back: {error}") from error

    def _promote(self, installed: Serving, old: Serving, outcome: UpdateOutcome) -> UpdateOutcome:
        self.journal.advance("promoting")
        self._store.activate(installed.version)
        failpoint("update.promoted")
        probation_until = None
        if outcome.kind == "update" and self._probation_s > 0:
            now = time.monotonic()
            self.probation = Probation(installed.version, old.manifest, now,
                                       now + self._probation_s)  # fmt: skip
            probation_until = time.time() + self._probation_s
        else:
            self.probation = None
        promoted = self._record(replace(outcome, result="promoted"),
                                probation_until=probation_until)  # fmt: skip
        failpoint("update.probation")
        return promoted

    async def _fall_back(self, reason: str) -> UpdateOutcome:
        assert self.probation is not None
        fallback, bad = self.probation.fallback, self.probation.version
        after_s = time.monotonic() - self.probation.promoted_at
        why = f"the engine died {after_s:.0f} s after {bad} was promoted: {reason}"
        logger.error("%s; restarting on %s", why, fallback.version)
        self.probation = None
        self.journal.begin("auto_rollback", fallback.version, bad, bad=(bad, why))
        outcome = UpdateOutcome("auto_rollback", fallback.version, bad, "promoted", why, "restart")
        timings = LoadTimings()

        async def change(dead: Serving | None) -> Serving:
            self.journal.advance("loading")
            if dead is not None:
                await self._loader.stop(dead)
            try:
                return await self._loader.start(fallback, self._loader.plan(fallback), timings)
            except LoadError as error:
                raise EngineDeadError(
                    f"the fallback {fallback.version} failed too: {error}"
                ) from error

        paused = time.perf_counter()
        try:
            await self._slot.swap(change, self._hold_s)
        except EngineDeadError as error:
            self._store.activate(fallback.version)  # the next start tries it, not the bad one
            self._record(replace(outcome, result="failed", reason=f"{why}; {error}"))
            raise
        self.journal.advance("promoting")
        self._store.activate(fallback.version)
        return self._record(replace(outcome, pause_s=time.perf_counter() - paused,
                                    reload_s=timings.load_s, smoke_s=timings.smoke_s,
                          gate_s=timings.gate_s))  # fmt: skip

    def _record(
        self, outcome: UpdateOutcome, *, bad: tuple[str, str] | None = None,
        probation_until: float | None = None,
    ) -> UpdateOutcome:  # fmt: skip
        outcome = replace(outcome, finished_at=time.time())
        self.journal.record(outcome, bad=bad, probation_until=probation_until)
        self._on_outcome(outcome)
        log = logger.info if outcome.result == "promoted" else logger.warning
        log("%s to %s: %s%s", outcome.kind, outcome.version, outcome.result,
            f" ({outcome.reason})" if outcome.reason else "")  # fmt: skip
        return outcome


def _settled(task: asyncio.Task[Any]) -> None:
    """A change's error is its caller's to handle; one whose caller went away is not lost in
    "exception was never retrieved" noise (the outcome is in the journal and the log)."""
    if not task.cancelled():
        task.exception()
