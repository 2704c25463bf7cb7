"""Background work the daemon owns: started, supervised, then cancelled and awaited at shutdown.

A task that raises is logged with its traceback and started again after a backoff (1 s,
doubling up to 60 s; back to 1 s once it has run for a minute), never dropped silently. A task
that returns has finished its job and is not started again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


class Supervisor:
    def __init__(
        self,
        *,
        first_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        healthy_after_s: float = 60.0,
    ) -> None:
        self._first, self._max, self._healthy_after = (
            first_backoff_s,
            max_backoff_s,
            healthy_after_s,
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.failures: Counter[str] = Counter()

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run()` as the task `name`, again after each failure, until `stop`."""
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        self._tasks[name] = asyncio.create_task(self._supervise(name, run), name=name)

    async def stop(self) -> None:
        """Cancel every task and wait for each to end."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        backoff = self._first
        while True:
            started = time.monotonic()
            try:
                await run()
                return
            except Exception:
                self.failures[name] += 1
                if time.monotonic() - started >= self._healthy_after:
                    backoff = self._first
                logger.exception(
                    "background task %s failed (%d so far); starting it again in %g s",
                    name, self.failures[name], backoff,
                )  # fmt: skip
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, self._max)
