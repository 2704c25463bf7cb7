"""Requests under way: a shutdown refuses new ones, waits for these, then cancels the rest; an
update holds new ones back while those under way finish."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

from edgeagent.errors import UnavailableError


class InflightRequests:
    def __init__(self) -> None:
        self._cancel_reasons: dict[str, str | None] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining_reason: str | None = None
        self._admitting = asyncio.Event()
        self._admitting.set()
        self.waiting = 0  # requests held at `admitted` by an update

    def __len__(self) -> int:
        return len(self._cancel_reasons)

    @contextlib.contextmanager
    def track(self) -> Iterator[str]:
        """Register a new request and yield its id; refused once draining has begun."""
        if self._draining_reason is not None:
            raise UnavailableError(self._draining_reason)
        request_id = uuid.uuid4().hex
        self._cancel_reasons[request_id] = None
        self._idle.clear()
        try:
            yield request_id
        finally:
            del self._cancel_reasons[request_id]
            if not self._cancel_reasons:
                self._idle.set()

    async def admitted(self) -> None:
        """Return once new requests are let in (at once, unless an update holds them)."""
        if self._admitting.is_set():
            return
        self.waiting += 1
        try:
            while not self._admitting.is_set():  # re-checked: another hold may start meanwhile
                await self._admitting.wait()
        finally:
            self.waiting -= 1

    @contextlib.asynccontextmanager
    async def held(self, within_s: float) -> AsyncIterator[None]:
        """New requests wait at `admitted`; those under way get `within_s` seconds to finish."""
        self._admitting.clear()
        try:
            if not await self.wait_idle(within_s):
                raise UnavailableError(
                    f"{len(self)} request(s) still running after {within_s:g} s; try again"
                )
            yield
        finally:
            self._admitting.set()

    def cancel_reason(self, request_id: str) -> str | None:
        """Why the server cancelled `request_id`, or None if it did not."""
        return self._cancel_reasons.get(request_id)

    def begin_drain(self, reason: str) -> None:
        """From now on new requests are refused with `reason`."""
        self._draining_reason = reason

    async def wait_idle(self, within_s: float) -> bool:
        """Wait up to `within_s` seconds for every request to finish; True if they did."""
        try:
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def mark_cancelled(self, reason: str) -> list[str]:
        """Record `reason` on every request under way and return their ids for the engine."""
        for request_id in self._cancel_reasons:
            self._cancel_reasons[request_id] = reason
        return list(self._cancel_reasons)
