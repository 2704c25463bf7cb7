"""The generation service: `Generate`, `GenerateStream`, `Tokenize`, `Detokenize` and the
model and server info, over what the slot serves."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from edgeagent.engine.interface import Delta, FinishReason
from edgeagent.engine.slot import Lease, ServingSlot
from edgeagent.errors import (
    ClientTooSlowError,
    EngineError,
    InvalidRequestError,
    RequestCancelledError,
)
from edgeagent.metrics import Metrics
from edgeagent.server.admission import Admission
from edgeagent.server.error_codes import Context, errors_as_status
from edgeagent.server.replies import (
    FINISH_REASONS,
    CompletionParts,
    RequestClock,
    model_info,
    server_info,
    token_infos,
)
from edgeagent.server.requests import PreparedRequest, prepare_request, tokenize
from edgeagent.settings import LimitSettings
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc


class GenerationService(pb_grpc.GenerationServiceServicer):
    """Each request leases what the slot serves when it is admitted, and keeps that engine and
    version to its end (a swap waits for it). A stream whose client stops reading for
    `write_timeout_s` is cancelled, so a slow reader cannot hold an engine slot for ever."""

    def __init__(
        self,
        slot: ServingSlot,
        limits: LimitSettings,
        metrics: Metrics | None = None,
        write_timeout_s: float = 30.0,
    ) -> None:
        self._slot = slot
        self._limits = limits
        self._metrics = metrics or Metrics()
        self._admission = Admission(slot, limits, self._metrics)
        self._write_timeout_s = write_timeout_s

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        async with (
            errors_as_status(context, self._metrics.observer("Generate")),
            self._slot.lease() as lease,
        ):
            prepared = self._admit(request, lease, context)
            clock = RequestClock()
            parts = [CompletionParts(index) for index in range(prepared.options.n)]
            input_tokens = None
            async for delta in self._deltas(lease, prepared, clock):
                parts[delta.index].add(delta)
                input_tokens = input_tokens or delta.prompt_tokens
            first = parts[0].message()
            response = pb.GenerateResponse(
                text=first.text, completion_tokens=first.completion_tokens,
                finish_reason=first.finish_reason, stop_sequence=first.stop_sequence,
                tokens=first.tokens, input_tokens=token_infos(input_tokens or ()),
                usage=clock.usage(), prompt_tokens=prepared.prompt_tokens,
                model_version=lease.serving.version,
            )  # fmt: skip
            if len(parts) > 1:
                response.completions.extend(part.message() for part in parts)
            if request.sampling.HasField("seed"):
                response.seed = request.sampling.seed
            return response
        raise AssertionError("unreachable: errors end the RPC")

    async def GenerateStream(self, request: pb.GenerateRequest, context: Context) -> None:
        async with (
            errors_as_status(context, self._metrics.observer("GenerateStream")),
            self._slot.lease() as lease,
        ):
            prepared = self._admit(request, lease, context)
            clock = RequestClock()
            async for delta in self._deltas(lease, prepared, clock):
                if delta.text or delta.tokens or delta.prompt_tokens or delta.finish_reason:
                    message = self._stream_message(request, prepared, lease, delta)
                    if clock.ended is not None:
                        message.usage.CopyFrom(clock.usage())
                    await self._write(context, message)

    def _admit(
        self, request: pb.GenerateRequest, lease: Lease, context: Context
    ) -> PreparedRequest:
        """Check and tokenize the request for the engine it leased; let it in or refuse it."""
        deadline_s = context.time_remaining()
        prepared = prepare_request(request, lease.serving.engine, self._limits, deadline_s)
        self._admission.admit(lease, prepared.prompt_tokens)
        return prepared

    async def _write(self, context: Context, message: pb.GenerateStreamResponse) -> None:
        try:
            async with asyncio.timeout(self._write_timeout_s):
                await context.write(message)
        except TimeoutError:
            raise ClientTooSlowError(
                f"the client read nothing for {self._write_timeout_s:g} s; the stream was "
                f"cancelled to free its engine slot"
            ) from None

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> pb.ModelInfo:
        async with errors_as_status(context):
            return model_info(self._slot.current())
        raise AssertionError("unreachable: errors end the RPC")

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Context
    ) -> pb.ServerInfo:
        async with errors_as_status(context):
            return server_info(self._slot.current(), self._limits, len(self._slot))
        raise AssertionError("unreachable: errors end the RPC")

    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        async with errors_as_status(context):
            serving = self._slot.current()
            ids = tokenize(request, serving.engine, self._limits)
            texts = serving.engine.token_texts(ids) if request.return_tokens else []
            return pb.TokenizeResponse(
                token_ids=ids, token_count=len(ids), tokens=texts, model_version=serving.version
            )
        raise AssertionError("unreachable: errors end the RPC")

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: Context
    ) -> pb.DetokenizeResponse:
        async with errors_as_status(context):
            serving = self._slot.current()
            if len(request.token_ids) * 4 > self._limits.max_input_bytes:
                raise InvalidRequestError(
                    "token_ids", f"{len(request.token_ids)} ids; the limit is "
                    f"{self._limits.max_input_bytes // 4}"
                )  # fmt: skip
            text = serving.engine.decode(request.token_ids, request.skip_special_tokens)
            return pb.DetokenizeResponse(text=text, model_version=serving.version)
        raise AssertionError("unreachable: errors end the RPC")

    async def _deltas(
        self, lease: Lease, prepared: PreparedRequest, clock: RequestClock
    ) -> AsyncIterator[Delta]:
        """The engine's deltas until every completion has finished. The request's time limit
        ends the unfinished ones with TIME_LIMIT; no first token within max_queue_ms refuses
        it; a request the server cancelled ends with the server's reason."""
        metrics, tokens = self._metrics, dict[int, int]()
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
            self._metrics.time_to_first_token.observe(clock.first_token - clock.started)
        clock.cached_prompt_tokens = max(clock.cached_prompt_tokens, delta.cached_prompt_tokens)
        tokens[delta.index] = delta.completion_tokens
        reason = self._slot.cancel_reason(request_id)
        if delta.finish_reason is FinishReason.CANCELLED and reason:
            raise RequestCancelledError(reason)
        if delta.finish_reason is FinishReason.ERROR:
            if prepared.options.constraint is not None:
                raise InvalidRequestError(
                    "constraint", "the engine could not apply it (its structured-output "
                    "backend failed to compile it; the server log says why)"
                )  # fmt: skip
            raise EngineError("the engine ended the request with an error")

    def _stream_message(
        self, request: pb.GenerateRequest, prepared: PreparedRequest, lease: Lease, delta: Delta
    ) -> pb.GenerateStreamResponse:
        message = pb.GenerateStreamResponse(
            text=delta.text, prompt_tokens=prepared.prompt_tokens,
            completion_tokens=delta.completion_tokens,
            finish_reason=FINISH_REASONS[delta.finish_reason],
            stop_sequence=delta.stop_sequence or "", model_version=lease.serving.version,
            index=delta.index, tokens=token_infos(delta.tokens),
            input_tokens=token_infos(delta.prompt_tokens),
        )  # fmt: skip
        if request.sampling.HasField("seed"):
            message.seed = request.sampling.seed
        return message


def _at(started: float, seconds: float | None) -> float | None:
    return None if seconds is None else started + seconds


def _earliest(*moments: float | None) -> float | None:
    return min((m for m in moments if m is not None), default=None)


def _left(moment: float | None) -> float | None:
    return None if moment is None else max(0.0, moment - time.perf_counter())
