"""Requests under way, so a shutdown can refuse new ones, wait for these, then cancel the rest."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator

from edgeagent.errors import UnavailableError


class InflightRequests:
    def __init__(self) -> None:
        self._cancel_reasons: dict[str, str | None] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining_reason: str | None = None

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
