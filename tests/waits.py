"""How the tests wait: for progress, never for a time sized on one machine.

CI machines differ 2-6x in speed (4-bit decode on an AVX2-only box ran ~6x slower than on an
AVX-512 one), so a test waits for the state it needs (a request admitted, a state reached, a
process exited, a line written) and its verdict never depends on how long that took. Each wait
keeps a hang guard, HANG_S, so that a stuck test fails naming what it waited for instead of at
pytest-timeout's per-test limit (pyproject.toml). The guard is not a claim about speed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

HANG_S = 600.0
"""Hang guard for one step (a CLI run, an engine start, a request, a process exiting, a signal
handled): a step that has shown no progress for this long is stuck, not slow. The slowest step,
an engine start on a cold compile cache, takes about a minute on a quiet 2-core box; 6x that
still fits."""


def wait_until(what: str, probe: Callable[[], T | None], every_s: float = 0.05) -> T:
    """Poll `probe` until it returns something true, and return that; fail after HANG_S."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(every_s)
    raise AssertionError(f"hang guard: still waiting for {what} after {HANG_S:g} s")


async def until(what: str, probe: Callable[[], T | None], every_s: float = 0.05) -> T:
    """`wait_until` for a coroutine: the event loop runs between the polls."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        await asyncio.sleep(every_s)
    raise AssertionError(f"hang guard: still waiting for {what} after {HANG_S:g} s")
