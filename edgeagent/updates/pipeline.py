"""An update: verify → check the layout → hold new requests → reload → smoke test → promote.

Same architecture and quantization layout: the weights are reloaded in place in the running
engine while new requests wait and requests under way finish first, so no request fails; a
candidate that fails its smoke test is swapped back out and marked bad, so it is not retried in
a loop. Another layout needs a drain and an engine restart, which this does not do yet: such an
update is refused and the old version keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

from edgeagent.artifacts.manifest import Manifest
from edgeagent.artifacts.store import ModelStore
from edgeagent.engine import Engine, SamplingOptions
from edgeagent.errors import CorruptArtifactError, EdgeAgentError, UpdateRefusedError

logger = logging.getLogger(__name__)

SMOKE_PROMPT = "The quick brown fox"
SMOKE_TOKENS = 8
HISTORY = 20
Result = Literal["promoted", "refused", "rolled_back"]


class RequestGate(Protocol):
    """Holds new requests back while those under way finish (the server's InflightRequests)."""

    def held(self, within_s: float) -> AbstractAsyncContextManager[None]: ...


@dataclass(frozen=True)
class UpdateOutcome:
    kind: Literal["update", "rollback"]
    version: str
    from_version: str
    result: Result
    reason: str = ""
    verify_s: float = 0.0
    pause_s: float = 0.0
    reload_s: float = 0.0
    smoke_s: float = 0.0
    finished_at: float = field(default_factory=time.time)


class Updater:
    def __init__(
        self,
        store: ModelStore,
        engine: Engine,
        gate: RequestGate,
        serving: Manifest,
        on_promoted: Callable[[Manifest], None],
        hold_s: float = 30.0,
    ) -> None:
        self._store, self._engine, self._gate = store, engine, gate
        self.serving = serving
        self._on_promoted, self._hold_s = on_promoted, hold_s
        self._lock = asyncio.Lock()
        self._bad: dict[str, str] = {}
        self.history: deque[UpdateOutcome] = deque(maxlen=HISTORY)

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

    async def _apply(self, version: str, kind: Literal["update", "rollback"]) -> UpdateOutcome:
        current = self.serving.version
        outcome = UpdateOutcome(kind, version, current, "refused")
        try:
            started = time.perf_counter()
            candidate = await asyncio.to_thread(self._store.verify, version)
            outcome = replace(
                outcome, version=candidate.version, verify_s=time.perf_counter() - started
            )
            self._check_candidate(candidate, current)
            outcome = await self._swap(candidate, outcome)
        except (UpdateRefusedError, CorruptArtifactError) as error:
            if isinstance(error, CorruptArtifactError):
                self._bad[outcome.version] = str(error)
            outcome = replace(outcome, result="refused", reason=str(error))
        outcome = replace(outcome, finished_at=time.time())
        self.history.appendleft(outcome)
        logger.info("%s to %s: %s %s", kind, outcome.version, outcome.result, outcome.reason)
        return outcome

    def _check_candidate(self, candidate: Manifest, current: str) -> None:
        if candidate.version == current:
            raise UpdateRefusedError(f"version {current} is already serving")
        if candidate.version in self._bad:
            raise UpdateRefusedError(f"marked bad earlier: {self._bad[candidate.version]}")
        if not same_layout(candidate, self.serving):
            raise UpdateRefusedError(
                f"{candidate.version} has another architecture or quantization layout than "
                f"{current}; it needs an engine restart: `edgeagent models activate` and restart"
            )

    async def _swap(self, candidate: Manifest, outcome: UpdateOutcome) -> UpdateOutcome:
        old_dir = self._store.model_dir(outcome.from_version)
        paused = time.perf_counter()
        async with self._gate.held(self._hold_s):
            reloaded = time.perf_counter()
            problem = await self._reload(self._store.model_dir(candidate.version))
            smoked = time.perf_counter()
            problem = problem or await self._smoke_test()
            if problem is not None:
                await self._engine.reload_weights(old_dir)  # the old weights, as they were
            done = time.perf_counter()
        timings = replace(
            outcome,
            pause_s=done - paused,
            reload_s=smoked - reloaded,
            smoke_s=done - smoked,
        )
        if problem is not None:
            self._bad[candidate.version] = problem
            return replace(timings, result="rolled_back", reason=problem)
        self._store.activate(candidate.version)
        self.serving = candidate
        self._on_promoted(candidate)
        return replace(timings, result="promoted")

    async def _reload(self, model_dir: Path) -> str | None:
        try:
            await self._engine.reload_weights(model_dir)
        except Exception as error:  # any failure inside vLLM: the old weights go back in
            logger.exception("reloading %s failed", model_dir)
            return f"reload failed: {error}"
        return None

    async def _smoke_test(self) -> str | None:
        """A short greedy generation must finish with the tokens asked for; None if it did."""
        options = SamplingOptions(max_tokens=SMOKE_TOKENS, temperature=0.0)
        tokens = 0
        try:
            prompt = self._engine.encode(SMOKE_PROMPT)
            request_id = f"smoke-{uuid.uuid4().hex}"
            async for delta in self._engine.stream(prompt, options, request_id):
                tokens = delta.completion_tokens
        except EdgeAgentError as error:
            return f"smoke test failed: {error}"
        if tokens != SMOKE_TOKENS:
            return f"smoke test produced {tokens} of {SMOKE_TOKENS} tokens"
        return None


LAYOUT_KEYS = ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")


def same_layout(a: Manifest, b: Manifest) -> bool:
    """In-place reload needs the same tensors: the architecture and the quantization layout
    (not the recipe that produced the numbers) alike."""

    def layout(m: Manifest) -> dict[str, object]:
        return {key: (m.quantization or {}).get(key) for key in LAYOUT_KEYS}

    return a.architecture == b.architecture and layout(a) == layout(b)
