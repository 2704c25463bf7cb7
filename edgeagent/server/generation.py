"""The transport-neutral serving core that gRPC and the OpenAI HTTP adapter both call: lease
what the slot serves, check and tokenize a `GenerationRequest` (`server/core.py`), admit it,
then stream the engine's deltas under the request's time limit, queue limit and the server's
cancel reasons. Errors are edgeagent's own (`errors.py`); each transport maps them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from edgeagent.engine.interface import Delta, FinishReason
from edgeagent.engine.slot import Lease, ServingSlot
from edgeagent.errors import EngineError, InvalidRequestError, RequestCancelledError
from edgeagent.metrics import Metrics
from edgeagent.server.admission import Admission
from edgeagent.server.core import GenerationRequest, Usage
from edgeagent.server.requests import PreparedRequest, prepare_request
from edgeagent.settings import LimitSettings


@dataclass
class RequestClock:
    """When a request was admitted, got its first token and ended, and its prefix-cache hits."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    ended: float | None = None
    cached_prompt_tokens: int = 0

    def usage(self) -> Usage:
        ended = self.ended if self.ended is not None else time.perf_counter()
        first = self.first_token if self.first_token is not None else ended
        return Usage(
            cached_prompt_tokens=self.cached_prompt_tokens,
            time_to_first_token_ms=(first - self.started) * 1000,
            total_time_ms=(ended - self.started) * 1000,
        )


@dataclass
class Admitted:
    """A request let in: the engine and version it keeps to its end, what it asks, its clock."""

    lease: Lease
    prepared: PreparedRequest
    clock: RequestClock = field(default_factory=RequestClock)

    @property
    def version(self) -> str:
        return self.lease.serving.version


class GenerationCore:
    def __init__(self, slot: ServingSlot, limits: LimitSettings, metrics: Metrics) -> None:
        self.slot, self.limits, self.metrics = slot, limits, metrics
        self._admission = Admission(slot, limits, metrics)

    @contextlib.asynccontextmanager
    async def admit(
        self, request: GenerationRequest, deadline_s: float | None = None
    ) -> AsyncIterator[Admitted]:
        """Lease, check and tokenize `request` for the engine it leased, let it in or refuse it;
        the lease is held until the block ends. `deadline_s`: what the caller's deadline leaves."""
        async with self.slot.lease() as lease:
            prepared = prepare_request(request, lease.serving.engine, self.limits, deadline_s)
            self._admission.admit(lease, prepared.prompt_tokens)
            yield Admitted(lease, prepared)

    async def deltas(self, admitted: Admitted) -> AsyncIterator[Delta]:
        """The engine's deltas until every completion has finished. The request's time limit
        ends the unfinished ones with TIME_LIMIT; no first token within max_queue_ms refuses
        it; a request the server cancelled ends with the server's reason."""
        lease, prepared, clock = admitted.lease, admitted.prepared, admitted.clock
        metrics, tokens = self.metrics, dict[int, int]()
        metrics.prompt_tokens.inc(prepared.prompt_tokens)
        engine, request_id = lease.serving.engine, lease.request_id
        stream = engine.stream(prepared.prompt_token_ids, prepared.options, request_id)
        unfinished = set(range(prepared.options.n))
        time_limit_at = _at(clock.started, prepared.time_limit_s)
        first_token_by = _at(clock.started, prepared.max_queue_s)
        try:
            async with contextlib.aclosing(stream):
                while unfinished:
                    waiting_first = clock.first_token is None
                    due = _earliest(time_limit_at, first_token_by if waiting_first else None)
                    try:
                        async with asyncio.timeout(_left(due)):
                            delta = await anext(stream)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        if due == time_limit_at:
                            clock.ended = time.perf_counter()
                            for index in sorted(unfinished):
                                yield Delta("", tokens.get(index, 0), FinishReason.TIME_LIMIT,
                                            index=index)  # fmt: skip
                            return
                        raise self._admission.queue_timeout(
                            time.perf_counter() - clock.started, engine.facts.max_num_seqs
                        ) from None
                    self._observe(delta, clock, tokens, prepared, request_id)
                    if delta.finish_reason is not None:
                        unfinished.discard(delta.index)
                        clock.ended = time.perf_counter() if not unfinished else None
                    yield delta
        finally:
            metrics.generated_tokens.inc(sum(tokens.values()))
            self._admission.finished(time.perf_counter() - clock.started)

    def _observe(self, delta: Delta, clock: RequestClock, tokens: dict[int, int],
                 prepared: PreparedRequest, request_id: str) -> None:  # fmt: skip
        """Note a delta's timing and counts; raise for the ways a request ends in error."""
        if clock.first_token is None and delta.completion_tokens:
            clock.first_token = time.perf_counter()
            self.metrics.time_to_first_token.observe(clock.first_token - clock.started)
        clock.cached_prompt_tokens = max(clock.cached_prompt_tokens, delta.cached_prompt_tokens)
        tokens[delta.index] = delta.completion_tokens
        reason = self.slot.cancel_reason(request_id)
        if delta.finish_reason is FinishReason.CANCELLED and reason:
            raise RequestCancelledError(reason)
        if delta.finish_reason is FinishReason.ERROR:
            if prepared.options.constraint is not None:
                raise InvalidRequestError(
                    "constraint", "the engine could not apply it (its structured-output "
                    "backend failed to compile it; the server log says why)"
                )  # fmt: skip
            raise EngineError("the engine ended the request with an error")


def _at(started: float, seconds: float | None) -> float | None:
    return None if seconds is None else started + seconds


def _earliest(*moments: float | None) -> float | None:
    return min((m for m in moments if m is not None), default=None)


def _left(moment: float | None) -> float | None:
    return None if moment is None else max(0.0, moment - time.perf_counter())
