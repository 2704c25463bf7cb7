"""What is served: the one engine running now, the version it serves, and the requests using it.

The serving slot is the only owner of the running engine. The generation service takes a lease
on it for each request (the engine and version that answer that request, start to end); health,
metrics and the admin status read it. Startup, the updater and shutdown change it, and only
through `swap`: new requests wait at the gate, those under way finish, and the change installs
the pair it returns; or, when the new engine was started beside the old one, through `switch`,
which holds no request. A change that leaves nothing servable empties the slot, so no one is
handed an engine that was shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from edgeagent.engine.interface import Engine
from edgeagent.errors import EngineError, UnavailableError
from edgeagent.fit import Plan
from edgeagent.store.manifest import Manifest

State = Literal["starting", "serving", "swapping", "empty", "draining"]


@dataclass(frozen=True)
class Serving:
    """An engine and the stored version it serves, with the fit plan it was sized by."""

    engine: Engine
    manifest: Manifest
    plan: Plan
    since: float = field(default_factory=time.monotonic)

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def model_id(self) -> str:
        return self.manifest.model_id


@dataclass(frozen=True)
class Lease:
    """One request's hold on the slot: its id in the engine, and what answers it."""

    request_id: str
    serving: Serving


@dataclass
class _Request:
    serving: Serving  # what answers it
    cancel_reason: str | None = None  # why the server cancelled it, if it did
    prompt_tokens: int = 0  # once known


Change = Callable[[Serving | None], Awaitable[Serving | None]]


class ServingSlot:
    def __init__(self) -> None:
        self._serving: Serving | None = None
        self._state: State = "starting"
        self._why_empty = "the daemon is starting: no model is loaded yet"
        self._requests: dict[str, _Request] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._request_ended = asyncio.Event()
        self._gate_open = asyncio.Event()
        self._gate_open.set()
        self._draining: str | None = None
        self._changed = asyncio.Condition()
        self._one_swap = asyncio.Lock()
        self.waiting = 0  # requests held at the gate by a swap

    # -- reading ----------------------------------------------------------------------------

    @property
    def serving(self) -> Serving | None:
        """What serves now; None while starting, after a failure that left nothing, at the end."""
        return self._serving

    def current(self) -> Serving:
        if self._serving is None:
            raise UnavailableError(self._why_empty)
        return self._serving

    @property
    def state(self) -> State:
        return "draining" if self._draining is not None else self._state

    @property
    def why_empty(self) -> str | None:
        return None if self._serving is not None else self._why_empty

    @property
    def accepting(self) -> bool:
        """Requests are answered (a swap only makes them wait): what health reports."""
        return self.state in ("serving", "swapping") and self._serving is not None

    def __len__(self) -> int:
        """Requests under way."""
        return len(self._requests)

    @property
    def prompt_tokens_under_way(self) -> int:
        """The prompt tokens of every request under way, as far as they are known."""
        return sum(request.prompt_tokens for request in self._requests.values())

    async def changed(self) -> None:
        """Return at the next change of state (for health watchers)."""
        async with self._changed:
            await self._changed.wait()

    # -- requests ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Lease]:
        """Admit a request: wait while a swap holds the gate, then hold what serves until the
        request ends. Refused (UnavailableError) while draining or when nothing serves."""
        await self._admitted()
        if self._draining is not None:
            raise UnavailableError(self._draining)
        serving = self.current()
        request_id = uuid.uuid4().hex
        self._requests[request_id] = _Request(serving)
        self._idle.clear()
        try:
            yield Lease(request_id, serving)
        finally:
            del self._requests[request_id]
            self._request_ended.set()
            if not self._requests:
                self._idle.set()

    async def _admitted(self) -> None:
        if self._gate_open.is_set():
            return
        self.waiting += 1
        try:
            while not self._gate_open.is_set():  # re-checked: another swap may hold it again
                await self._gate_open.wait()
        finally:
            self.waiting -= 1

    def note_prompt(self, request_id: str, tokens: int) -> None:
        if (request := self._requests.get(request_id)) is not None:
            request.prompt_tokens = tokens

    def cancel_reason(self, request_id: str) -> str | None:
        """Why the server cancelled `request_id`, or None if it did not."""
        request = self._requests.get(request_id)
        return request.cancel_reason if request is not None else None

    async def cancel(self, reason: str, on: Serving | None = None) -> int:
        """End every request under way (`on`: those answered by that engine): `reason` is
        recorded for its caller, then the engine answering it aborts it. How many there were."""
        ending = [(i, r) for i, r in self._requests.items() if on is None or r.serving is on]
        for _, request in ending:
            request.cancel_reason = reason
        for request_id, request in ending:
            with contextlib.suppress(EngineError):  # an engine that cannot abort is stopped next
                await request.serving.engine.abort(request_id)
        return len(ending)

    async def wait_released(self, serving: Serving, within_s: float) -> bool:
        """Wait up to `within_s` seconds until no request is answered by `serving`'s engine;
        True if none is."""
        try:
            async with asyncio.timeout(within_s):
                while True:
                    self._request_ended.clear()  # before the check: no end goes unseen
                    if not any(r.serving is serving for r in self._requests.values()):
                        return True
                    await self._request_ended.wait()
        except TimeoutError:
            return False

    async def wait_idle(self, within_s: float) -> bool:
        """Wait up to `within_s` seconds for every request to finish; True if they did."""
        try:
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    # -- changing ---------------------------------------------------------------------------

    async def swap(self, change: Change, hold_s: float | None) -> Serving | None:
        """The one way what is served changes.

        One swap at a time. New requests wait at the gate; those under way get `hold_s` seconds
        to finish (if they don't, UnavailableError and nothing changed; None: no wait, for
        shutdown, which drained or cancelled them already). Then `change` is called with what
        serves and returns what serves from now: a new pair, the old one as it was or put back,
        or None (shutdown). If `change` raises, it could leave nothing servable: the slot is
        empty, health says so, requests are refused with the reason, and the error propagates.
        """
        async with self._one_swap:
            return await self._swap(change, hold_s)

    async def _swap(self, change: Change, hold_s: float | None) -> Serving | None:
        self._gate_open.clear()
        try:
            if hold_s is not None and not await self.wait_idle(hold_s):
                raise UnavailableError(
                    f"{len(self)} request(s) still running after {hold_s:g} s; try again"
                )
            await self._set_state("swapping")
            try:
                installed = await change(self._serving)
            except BaseException as error:
                self._serving, self._why_empty = None, f"no model is loaded: {error}"
                raise
            self._serving = installed
            if installed is None:
                self._why_empty = "the daemon is shutting down"
            return installed
        finally:
            self._gate_open.set()
            await self._set_state("serving" if self._serving is not None else "empty")

    async def switch(self, installed: Serving) -> Serving:
        """Serve `installed` from the next request on without holding any at the gate: its
        engine already runs beside the one serving now. Requests under way keep the engine
        they were admitted with. Returns what served before (the caller stops it once
        `wait_released` says its requests are done)."""
        async with self._one_swap:
            before = self.current()
            self._serving = installed
            await self._notify()
            return before

    async def begin_drain(self, reason: str) -> None:
        """From now on new requests are refused with `reason` (shutdown)."""
        self._draining = reason
        await self._notify()

    async def _set_state(self, state: State) -> None:
        self._state = state
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
