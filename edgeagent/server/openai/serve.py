"""Serving one OpenAI request through the core: unary as JSON, `stream: true` as server-sent
events ending in `data: [DONE]`. A client that goes away aborts the engine request, as a gRPC
cancel does: a stream's task is cancelled, a unary request is watched for the disconnect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from edgeagent.errors import ClientTooSlowError
from edgeagent.server.core import CompletionParts
from edgeagent.server.error_codes import Status, http_error_for, status_for
from edgeagent.server.generation import GenerationCore
from edgeagent.server.openai.errors import error_body
from edgeagent.server.openai.replies import Reply, chunk, sse, unary_body, usage_chunk
from edgeagent.server.openai.requests import ChatRequest, CompletionRequest

logger = logging.getLogger(__name__)
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first


class Generation:
    def __init__(self, core: GenerationCore, write_timeout_s: float | None = None) -> None:
        self._core, self._write_timeout_s = core, write_timeout_s

    async def serve(
        self, body: ChatRequest | CompletionRequest, request: Request, chat: bool
    ) -> Response:
        method = "ChatCompletions" if chat else "Completions"
        report = self._core.metrics.observer(f"http.{method}")
        try:
            generate = body.to_generation_request()
            if body.stream:
                stack = contextlib.AsyncExitStack()
                admitted = await stack.enter_async_context(self._core.admit(generate))
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = self._events(Reply(chat, admitted), include_usage, report)
                return _Stream(events, stack, self._write_timeout_s)
            async with self._core.admit(generate) as admitted:
                response = await self._unary(Reply(chat, admitted), request)
        except Exception as exc:
            report(status_for(exc)[0].name)
            raise
        report((Status.OK if response.status_code == 200 else Status.CANCELLED).name)
        return response

    async def _unary(self, reply: Reply, request: Request) -> Response:
        parts = [CompletionParts(index) for index in range(reply.admitted.prepared.options.n)]

        async def gather() -> None:
            async for delta in self._core.deltas(reply.admitted):
                parts[delta.index].add(delta)

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, gone):
                task.cancel()
            await asyncio.gather(gone, return_exceptions=True)
        if not work.done() or work.cancelled():
            await asyncio.gather(work, return_exceptions=True)
            return Response(status_code=CLIENT_CLOSED)
        work.result()  # an error raised while generating
        return JSONResponse(unary_body(reply, parts))

    async def _events(
        self, reply: Reply, include_usage: bool, report: Callable[[str], None]
    ) -> AsyncIterator[bytes]:
        tokens, started, status = dict[int, int](), set[int](), Status.CANCELLED
        try:
            async for delta in self._core.deltas(reply.admitted):
                tokens[delta.index] = delta.completion_tokens
                first = reply.chat and delta.index not in started
                if first or delta.text or delta.tokens or delta.finish_reason:
                    started.add(delta.index)
                    yield sse(chunk(reply, delta, first, include_usage))
            if include_usage:
                yield sse(usage_chunk(reply, sum(tokens.values())))
            status = Status.OK
        except Exception as exc:
            status = status_for(exc)[0]
            yield sse(error_body(http_error_for(exc)))
        finally:
            report(status.name)
        yield sse("[DONE]")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Stream(StreamingResponse):
    """Server-sent events that release the request's lease however the response ends (the
    client gone before the first byte included). A client that reads nothing for
    `write_timeout_s` (its socket's buffer full) is cut off, as gRPC's are, so that it does not
    hold an engine slot forever."""

    def __init__(self, events: AsyncIterator[bytes], stack: contextlib.AsyncExitStack,
                 write_timeout_s: float | None) -> None:  # fmt: skip
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})  # fmt: skip
        self._events, self._stack, self._write_timeout_s = events, stack, write_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_in_time(message: Message) -> None:
            try:
                async with asyncio.timeout(self._write_timeout_s):
                    await send(message)
            except TimeoutError:
                raise ClientTooSlowError(
                    f"the client read nothing for {self._write_timeout_s:g} s; the stream was "
                    f"cut to free its engine slot"
                ) from None

        try:
            await super().__call__(scope, receive, send_in_time)
        except ClientTooSlowError as slow:
            logger.warning("%s", slow)
        finally:
            try:
                await self._events.aclose()  # type: ignore[attr-defined]
            finally:
                await self._stack.aclose()
