"""The generation service: `Generate`, `GenerateStream`, `Tokenize`, `Detokenize` and the
model and server info, over what the slot serves."""

from __future__ import annotations

import asyncio

from edgeagent.engine.slot import ServingSlot
from edgeagent.errors import (
    ClientTooSlowError,
    InvalidRequestError,
)
from edgeagent.metrics import Metrics
from edgeagent.server.core import CompletionParts
from edgeagent.server.generation import GenerationCore
from edgeagent.server.grpc_errors import Context, errors_as_status
from edgeagent.server.grpc_mapping import (
    completion_message,
    generation_request,
    prompt_input,
    stream_message,
    token_infos,
    usage_message,
)
from edgeagent.server.replies import model_info, server_info
from edgeagent.server.requests import tokenize
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
        self.core = GenerationCore(slot, limits, self._metrics)
        self._write_timeout_s = write_timeout_s

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        async with (
            errors_as_status(context, self._metrics.observer("Generate")),
            self.core.admit(generation_request(request), context.time_remaining()) as admitted,
        ):
            lease, prepared = admitted.lease, admitted.prepared
            parts = [CompletionParts(index) for index in range(prepared.options.n)]
            input_tokens = None
            async for delta in self.core.deltas(admitted):
                parts[delta.index].add(delta)
                input_tokens = input_tokens or delta.prompt_tokens
            first = completion_message(parts[0])
            response = pb.GenerateResponse(
                text=first.text, completion_tokens=first.completion_tokens,
                finish_reason=first.finish_reason, stop_sequence=first.stop_sequence,
                tokens=first.tokens, input_tokens=token_infos(input_tokens or ()),
                usage=usage_message(admitted.clock.usage()), prompt_tokens=prepared.prompt_tokens,
                model_version=lease.serving.version,
            )  # fmt: skip
            if len(parts) > 1:
                response.completions.extend(completion_message(part) for part in parts)
            if request.sampling.HasField("seed"):
                response.seed = request.sampling.seed
            return response
        raise AssertionError("unreachable: errors end the RPC")

    async def GenerateStream(self, request: pb.GenerateRequest, context: Context) -> None:
        async with (
            errors_as_status(context, self._metrics.observer("GenerateStream")),
            self.core.admit(generation_request(request), context.time_remaining()) as admitted,
        ):
            prompt_tokens, clock = admitted.prepared.prompt_tokens, admitted.clock
            async for delta in self.core.deltas(admitted):
                if delta.text or delta.tokens or delta.prompt_tokens or delta.finish_reason:
                    message = stream_message(delta, prompt_tokens, admitted.version)
                    if request.sampling.HasField("seed"):
                        message.seed = request.sampling.seed
                    if clock.ended is not None:
                        message.usage.CopyFrom(usage_message(clock.usage()))
                    await self._write(context, message)

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
            ids = tokenize(prompt_input(request), serving.engine, self._limits)
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
