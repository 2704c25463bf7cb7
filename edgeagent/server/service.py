"""The generation service: `Generate`, `GenerateStream`, `GetModelInfo` over the engine."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

from edgeagent.engine import Delta, Engine, FinishReason
from edgeagent.errors import RequestCancelledError
from edgeagent.metrics import Metrics
from edgeagent.server.inflight import InflightRequests
from edgeagent.server.requests import PreparedRequest, prepare_request
from edgeagent.server.status import Context, errors_as_status
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


@dataclass(frozen=True)
class ServedModel:
    """Who the served model is, for responses and `GetModelInfo`."""

    model_id: str
    version: str


class GenerationService(pb_grpc.GenerationServiceServicer):
    def __init__(
        self,
        engine: Engine,
        served: ServedModel,
        limits: LimitSettings,
        inflight: InflightRequests,
        metrics: Metrics | None = None,
    ) -> None:
        self._engine = engine
        self._served = served
        self._limits = limits
        self._inflight = inflight
        self._metrics = metrics or Metrics()
        self._metrics.running.set_function(lambda: len(inflight))
        self._metrics.waiting.set_function(lambda: inflight.waiting)
        self._metrics.set_serving(served.model_id, served.version)

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        async with errors_as_status(context, self._metrics.observer("Generate")):
            prepared = await self._admit(request)
            texts: list[str] = []
            last = Delta("", 0)
            async for last in self._deltas(prepared):
                texts.append(last.text)
            response = pb.GenerateResponse(text="".join(texts))
            return self._fill(response, request, prepared, last)
        raise AssertionError("unreachable: errors end the RPC")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with errors_as_status(context, self._metrics.observer("GenerateStream")):
            prepared = await self._admit(request)
            async for delta in self._deltas(prepared):
                if delta.text or delta.finish_reason is not None:
                    message = pb.GenerateStreamResponse(text=delta.text)
                    yield self._fill(message, request, prepared, delta)

    @property
    def served(self) -> ServedModel:
        return self._served

    def use(self, engine: Engine, served: ServedModel) -> None:
        """Serve from `engine` as `served` from the next request or message on (an update)."""
        self._engine, self._served = engine, served
        self._metrics.set_serving(served.model_id, served.version)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> pb.ModelInfo:
        facts = self._engine.facts
        return pb.ModelInfo(
            model_id=self._served.model_id,
            version=self._served.version,
            max_context_tokens=facts.max_model_len,
            max_concurrent_requests=facts.max_num_seqs,
            architecture=facts.architecture,
            quantization=facts.quantization,
        )

    async def _admit(self, request: pb.GenerateRequest) -> PreparedRequest:
        """Wait while an update holds new requests, then check and tokenize for the engine
        that will run it (an update may have brought another engine)."""
        await self._inflight.admitted()
        return prepare_request(request, self._engine, self._limits)

    async def _deltas(self, prepared: PreparedRequest) -> AsyncIterator[Delta]:
        """The engine's deltas; a request the server cancelled ends with the server's reason."""
        with self._inflight.track() as request_id:  # nothing awaited since `_admit`: no hold began
            metrics, started, tokens = self._metrics, time.perf_counter(), 0
            metrics.prompt_tokens.inc(prepared.prompt_tokens)
            stream = self._engine.stream(prepared.prompt_token_ids, prepared.options, request_id)
            try:
                async with contextlib.aclosing(stream):
                    async for delta in stream:
                        if tokens == 0 and delta.completion_tokens:
                            metrics.time_to_first_token.observe(time.perf_counter() - started)
                        tokens = delta.completion_tokens
                        reason = self._inflight.cancel_reason(request_id)
                        if delta.finish_reason is FinishReason.CANCELLED and reason:
                            raise RequestCancelledError(reason)
                        yield delta
            finally:
                metrics.generated_tokens.inc(tokens)

    def _fill(
        self, message: _Reply, request: pb.GenerateRequest, prepared: PreparedRequest, delta: Delta
    ) -> _Reply:
        """Set the fields the unary and the streamed replies share."""
        message.prompt_tokens = prepared.prompt_tokens
        message.completion_tokens = delta.completion_tokens
        message.finish_reason = _FINISH_REASONS[delta.finish_reason]
        message.stop_sequence = delta.stop_sequence or ""
        message.model_version = self._served.version
        if request.sampling.HasField("seed"):
            message.seed = request.sampling.seed
        return message
