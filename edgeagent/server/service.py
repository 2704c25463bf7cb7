"""The generation service: `Generate`, `GenerateStream`, `GetModelInfo` over the engine."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from edgeagent.engine.interface import Delta, FinishReason
from edgeagent.engine.slot import Lease, ServingSlot
from edgeagent.errors import ClientTooSlowError, RequestCancelledError
from edgeagent.metrics import Metrics
from edgeagent.server.admission import Admission
from edgeagent.server.error_codes import Context, errors_as_status
from edgeagent.server.requests import PreparedRequest, prepare_request
from edgeagent.settings import LimitSettings
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

_Reply = TypeVar("_Reply", pb.GenerateResponse, pb.GenerateStreamResponse)

_FINISH_REASONS = {
    None: pb.FINISH_REASON_NOT_FINISHED,
    FinishReason.MAX_TOKENS: pb.FINISH_REASON_MAX_TOKENS,
    FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.TOKEN_LIMIT: pb.FINISH_REASON_TOKEN_LIMIT,
}


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
            prepared = self._admit(request, lease)
            texts: list[str] = []
            last = Delta("", 0)
            async for last in self._deltas(lease, prepared):
                texts.append(last.text)
            response = pb.GenerateResponse(text="".join(texts))
            return self._fill(response, request, prepared, lease, last)
        raise AssertionError("unreachable: errors end the RPC")

    async def GenerateStream(self, request: pb.GenerateRequest, context: Context) -> None:
        async with (
            errors_as_status(context, self._metrics.observer("GenerateStream")),
            self._slot.lease() as lease,
        ):
            prepared = self._admit(request, lease)
            async for delta in self._deltas(lease, prepared):
                if delta.text or delta.finish_reason is not None:
                    message = pb.GenerateStreamResponse(text=delta.text)
                    await self._write(context, self._fill(message, request, prepared, lease, delta))

    def _admit(self, request: pb.GenerateRequest, lease: Lease) -> PreparedRequest:
        """Check and tokenize the request for the engine it leased; let it in or refuse it."""
        prepared = prepare_request(request, lease.serving.engine, self._limits)
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
            serving = self._slot.current()
            facts = serving.engine.facts
            return pb.ModelInfo(
                model_id=serving.model_id,
                version=serving.version,
                max_context_tokens=facts.max_model_len,
                max_concurrent_requests=facts.max_num_seqs,
                architecture=facts.architecture,
                quantization=facts.quantization,
            )
        raise AssertionError("unreachable: errors end the RPC")

    async def _deltas(self, lease: Lease, prepared: PreparedRequest) -> AsyncIterator[Delta]:
        """The engine's deltas; a request the server cancelled ends with the server's reason."""
        metrics, started, tokens = self._metrics, time.perf_counter(), 0
        metrics.prompt_tokens.inc(prepared.prompt_tokens)
        engine, request_id = lease.serving.engine, lease.request_id
        stream = engine.stream(prepared.prompt_token_ids, prepared.options, request_id)
        try:
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    if tokens == 0 and delta.completion_tokens:
                        metrics.time_to_first_token.observe(time.perf_counter() - started)
                    tokens = delta.completion_tokens
                    reason = self._slot.cancel_reason(request_id)
                    if delta.finish_reason is FinishReason.CANCELLED and reason:
                        raise RequestCancelledError(reason)
                    yield delta
        finally:
            metrics.generated_tokens.inc(tokens)
            self._admission.finished(time.perf_counter() - started)

    def _fill(
        self, message: _Reply, request: pb.GenerateRequest, prepared: PreparedRequest,
        lease: Lease, delta: Delta,
    ) -> _Reply:  # fmt: skip
        """Set the fields the unary and the streamed replies share."""
        message.prompt_tokens = prepared.prompt_tokens
        message.completion_tokens = delta.completion_tokens
        message.finish_reason = _FINISH_REASONS[delta.finish_reason]
        message.stop_sequence = delta.stop_sequence or ""
        message.model_version = lease.serving.version
        if request.sampling.HasField("seed"):
            message.seed = request.sampling.seed
        return message
