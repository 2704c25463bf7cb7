"""How long each step of an update may wait on an engine, and the waiting itself.

Issue 26: a reload of Marlin-format weights left vLLM unable to run its next step; the smoke
test waited for ever and every client with it. So every step an update awaits on an engine has
a bound derived from what the step does, and the engine's liveness is polled while it runs (a
dead engine is noticed within `model.health_check_s`, not at the bound). A step past its bound,
or whose engine died, raises EngineUnresponsiveError: the engine no longer answers, and the
update stops it and serves the old version on a fresh engine.

    smoke test    floor + SMOKE_TOKENS x SLACK x the slowest seconds per token a smoke test
                  has taken in this process (the engine's own start measures it; before any:
                  UNMEASURED_FACTOR x floor)
    reload        floor + the weight bytes at SLOW_READ_BYTES_PER_S (a cold read off a slow disk)
    engine start  start floor (compilation included) + the weight bytes at SLOW_READ_BYTES_PER_S
    gate scoring  floor + SLACK x the serving version's scoring of the same set, timed before
                  the pause; that scoring itself: floor + prompt tokens x SLACK x seconds per
                  token (prefill is far faster per token than that: it runs before the pause,
                  holding no one, so generous costs nothing)

floor: `updates.step_timeout_s` (60 s); start floor: `updates.start_timeout_s` (900 s). SLACK
covers the same machine being slower than when it measured (load, a cold cache, a 2-core CI
runner): measured on the machine itself, the bounds follow a slow CPU without tripping on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from edgeagent.engine.interface import Engine
from edgeagent.errors import EngineError, EngineUnresponsiveError
from edgeagent.settings import MiB, Settings

SLACK = 10.0
UNMEASURED_FACTOR = 5.0
SLOW_READ_BYTES_PER_S = 100 * MiB

T = TypeVar("T")


@dataclass
class StepBounds:
    floor_s: float = 60.0
    start_floor_s: float = 900.0
    poll_s: float = 5.0  # how often the engine's liveness is checked while a step runs
    token_s: float | None = None  # the slowest seconds per token of a passed smoke test

    @classmethod
    def from_settings(cls, settings: Settings) -> StepBounds:
        updates = settings.updates
        return cls(updates.step_timeout_s, updates.start_timeout_s,
                   settings.model.health_check_s)  # fmt: skip

    def note_smoke_test(self, seconds: float, tokens: int) -> None:
        per_token = seconds / max(1, tokens)
        self.token_s = max(per_token, self.token_s or 0.0)

    def smoke_test_s(self, tokens: int) -> float:
        if self.token_s is None:
            return UNMEASURED_FACTOR * self.floor_s
        return self.floor_s + tokens * SLACK * self.token_s

    def reload_s(self, weight_bytes: int) -> float:
        return self.floor_s + weight_bytes / SLOW_READ_BYTES_PER_S

    def start_s(self, weight_bytes: int) -> float:
        return self.start_floor_s + weight_bytes / SLOW_READ_BYTES_PER_S

    def scoring_s(self, measured_s: float | None, prompt_tokens: int) -> float:
        """The gate's scoring: `measured_s`, the serving version's on the same set, or None
        for that scoring itself."""
        if measured_s is not None:
            return self.floor_s + SLACK * measured_s
        if self.token_s is None:
            return UNMEASURED_FACTOR * self.floor_s
        return self.floor_s + prompt_tokens * SLACK * self.token_s


async def within(engine: Engine, step: Awaitable[T], bound_s: float, what: str,
                 poll_s: float) -> T:  # fmt: skip
    """`step`'s result, awaited for at most `bound_s` seconds while `engine`'s health is checked
    every `poll_s`; EngineUnresponsiveError (the step cancelled) when it runs past the bound or
    the engine dies meanwhile. `what` names the step in the error: "the smoke test"."""
    work = asyncio.ensure_future(step)
    watch = asyncio.create_task(_until_dead(engine, poll_s))
    try:
        done, _ = await asyncio.wait({work, watch}, timeout=bound_s,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work in done:
        return work.result()
    if watch in done:
        raise EngineUnresponsiveError(f"the engine died during {what}: {watch.result()}")
    raise EngineUnresponsiveError(f"{what} did not finish within {bound_s:.1f} s")


async def _until_dead(engine: Engine, poll_s: float) -> str:
    """Return why, once the engine's health check fails."""
    while True:
        await asyncio.sleep(poll_s)
        try:
            await engine.check_health()
        except EngineError as dead:
            return str(dead)
