"""An update: verify → fit → hold new requests → load → smoke test → promote, or put back.

Same architecture and quantization layout: the weights are reloaded in place in the running
engine. Another layout: the engine is stopped and started on the candidate. Either way new
requests wait (they are not refused) and requests under way finish first, so no request fails
because of an update. A candidate that fails to load or fails its smoke test is swapped back out
and marked bad, so it is not retried in a loop. After a promotion the old version stays the
fallback for a probation window: if the engine dies within it, the updater restarts the engine
on the old version instead of letting the daemon exit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Protocol

from edgeagent.artifacts.manifest import Manifest
from edgeagent.artifacts.store import ModelStore
from edgeagent.engine import Engine, SamplingOptions
from edgeagent.engine_host import EngineHost
from edgeagent.errors import (
    CorruptArtifactError,
    EdgeAgentError,
    EngineDeadError,
    UpdateRefusedError,
)
from edgeagent.updates.journal import Kind, Method, UpdateJournal, UpdateOutcome

logger = logging.getLogger(__name__)

SMOKE_PROMPT = "The quick brown fox"
SMOKE_TOKENS = 8


class RequestGate(Protocol):
    """Holds new requests back while those under way finish (the server's InflightRequests)."""

    def held(self, within_s: float) -> AbstractAsyncContextManager[None]: ...


@dataclass(frozen=True)
class Probation:
    fallback: Manifest
    promoted_at: float
    until: float


class Updater:
    def __init__(
        self,
        store: ModelStore,
        host: EngineHost,
        gate: RequestGate,
        serving: Manifest,
        on_promoted: Callable[[Engine, Manifest], None],
        journal: UpdateJournal | None = None,
        *,
        hold_s: float = 30.0,
        probation_s: float = 300.0,
        on_outcome: Callable[[UpdateOutcome], None] = lambda outcome: None,
    ) -> None:
        self._store, self._host, self._gate = store, host, gate
        self.serving = serving
        self._on_promoted = on_promoted
        self.journal = journal or UpdateJournal(None)
        self._hold_s, self._probation_s = hold_s, probation_s
        self._on_outcome = on_outcome
        self._lock = asyncio.Lock()
        self.candidate: str | None = None
        self.probation: Probation | None = None

    @property
    def previous_version(self) -> str | None:
        return self._store.refs().previous

    async def update(self, version: str) -> UpdateOutcome:
        async with self._lock:
            return await self._apply(version, "update")

    async def rollback(self) -> UpdateOutcome:
        async with self._lock:
            refs = self._store.refs()
            if refs.previous is None:
                raise UpdateRefusedError("the store has no previous version to roll back to")
            return await self._apply(refs.previous, "rollback")

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

    async def engine_died(self, reason: str) -> UpdateOutcome | None:
        """The engine died: within a probation window, serve the fallback again (the new version
        is marked bad) and return what happened; None when there is nothing to fall back to."""
        if not self.in_probation():
            return None
        async with self._lock:
            assert self.probation is not None
            fallback, bad = self.probation.fallback, self.serving
            after_s = time.monotonic() - self.probation.promoted_at
            why = f"the engine died {after_s:.0f} s after {bad.version} was promoted: {reason}"
            logger.error("%s; restarting on %s", why, fallback.version)
            self.journal.mark_bad(bad.version, why)
            paused = time.perf_counter()
            async with self._gate.held(self._hold_s):
                await self._load_back(fallback, "restart")
                smoking = time.perf_counter()
                if (problem := await self._smoke_test()) is not None:
                    raise EngineDeadError(f"the fallback {fallback.version} failed too: {problem}")
                done = time.perf_counter()
            self._promote(fallback, bad)
            self.probation = None
            outcome = UpdateOutcome(
                "auto_rollback", fallback.version, bad.version, "promoted", why, "restart",
                pause_s=done - paused, reload_s=smoking - paused, smoke_s=done - smoking,
            )  # fmt: skip
            return self._record(outcome)

    async def _apply(self, version: str, kind: Kind) -> UpdateOutcome:
        outcome = UpdateOutcome(kind, version, self.serving.version, "refused")
        self.candidate = version
        try:
            started = time.perf_counter()
            candidate = await asyncio.to_thread(self._store.verify, version)
            outcome = replace(
                outcome, version=candidate.version, verify_s=time.perf_counter() - started
            )
            method = self._check_candidate(candidate)
            outcome = await self._swap(candidate, outcome, method)
        except (UpdateRefusedError, CorruptArtifactError) as error:
            if isinstance(error, CorruptArtifactError):
                self.journal.mark_bad(outcome.version, str(error))
            outcome = replace(outcome, result="refused", reason=str(error))
        finally:
            self.candidate = None
        return self._record(outcome)

    def _record(self, outcome: UpdateOutcome) -> UpdateOutcome:
        outcome = replace(outcome, finished_at=time.time())
        self.journal.record(outcome)
        self._on_outcome(outcome)
        logger.info(
            "%s to %s: %s%s", outcome.kind, outcome.version, outcome.result,
            f" ({outcome.reason})" if outcome.reason else "",
        )  # fmt: skip
        return outcome

    def _check_candidate(self, candidate: Manifest) -> Method:
        """How to load the candidate: in place, or with a new engine; refused if neither."""
        if candidate.version == self.serving.version:
            raise UpdateRefusedError(f"version {candidate.version} is already serving")
        if candidate.version in self.journal.bad:
            raise UpdateRefusedError(f"marked bad earlier: {self.journal.bad[candidate.version]}")
        if same_layout(candidate, self.serving):
            return "reload"
        fit = self._host.plan(candidate, replacing=True)
        if not fit.fits:
            raise UpdateRefusedError(
                f"{candidate.version} does not fit: " + "; ".join(fit.problems)
            )
        return "restart"

    async def _swap(
        self, candidate: Manifest, outcome: UpdateOutcome, method: Method
    ) -> UpdateOutcome:
        old = self.serving
        paused = time.perf_counter()
        async with self._gate.held(self._hold_s):
            loading = time.perf_counter()
            problem = await self._load(candidate, method)
            smoking = time.perf_counter()
            problem = problem or await self._smoke_test()
            if problem is not None:
                await self._load_back(old, method)
            done = time.perf_counter()
        outcome = replace(
            outcome, method=method, pause_s=done - paused, reload_s=smoking - loading,
            smoke_s=done - smoking,
        )  # fmt: skip
        if problem is not None:
            self.journal.mark_bad(candidate.version, problem)
            return replace(outcome, result="rolled_back", reason=problem)
        self._promote(candidate, old)
        return replace(outcome, result="promoted")

    def _promote(self, candidate: Manifest, old: Manifest) -> None:
        self._store.activate(candidate.version)
        self.serving = candidate
        self._on_promoted(self._host.engine, candidate)
        now = time.monotonic()
        self.probation = Probation(old, now, now + self._probation_s)

    async def _load(self, manifest: Manifest, method: Method) -> str | None:
        """Load the candidate; why it failed, or None."""
        try:
            await self._bring_in(manifest, method)
        except Exception as error:  # any failure inside vLLM: the old version goes back in
            logger.exception("loading %s (%s) failed", manifest.version, method)
            return f"{method} failed: {error}"
        return None

    async def _load_back(self, old: Manifest, method: Method) -> None:
        """Serve `old` again, as it was; if even that fails the engine is dead."""
        try:
            await self._bring_in(old, method)
        except Exception as error:
            raise EngineDeadError(f"could not put {old.version} back: {error}") from error

    async def _bring_in(self, manifest: Manifest, method: Method) -> None:
        if method == "reload":
            await self._host.engine.reload_weights(self._store.model_dir(manifest.version))
        else:
            await self._host.restart(manifest)

    async def _smoke_test(self) -> str | None:
        """A short greedy generation must produce tokens with finite log-probabilities."""
        options = SamplingOptions(max_tokens=SMOKE_TOKENS, temperature=0.0, logprobs=True)
        tokens, logprobs = 0, list[float]()
        try:
            engine = self._host.engine
            request_id = f"smoke-{uuid.uuid4().hex}"
            async for delta in engine.stream(engine.encode(SMOKE_PROMPT), options, request_id):
                tokens = delta.completion_tokens
                logprobs += delta.logprobs
        except EdgeAgentError as error:
            return f"smoke test failed: {error}"
        if tokens == 0:
            return "smoke test produced no tokens"
        if len(logprobs) != tokens or not all(math.isfinite(p) for p in logprobs):
            return f"smoke test produced non-finite output (log-probabilities {logprobs})"
        return None


LAYOUT_KEYS = ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")


def same_layout(a: Manifest, b: Manifest) -> bool:
    """In-place reload needs the same tensors: the architecture and the quantization layout
    (not the recipe that produced the numbers) alike."""

    def layout(m: Manifest) -> dict[str, object]:
        return {key: (m.quantization or {}).get(key) for key in LAYOUT_KEYS}

    return a.architecture == b.architecture and layout(a) == layout(b)
