"""The OpenAI-compatible HTTP API (FastAPI): a thin adapter onto the serving core. A body is
validated by pydantic, turned into the core's `GenerationRequest` and served by
`GenerationCore`, exactly as a gRPC request is; errors take their status from
`server/error_codes.py`."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeagent.engine.slot import ServingSlot
from edgeagent.errors import (
    EdgeAgentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from edgeagent.server.error_codes import http_error_for
from edgeagent.server.generation import GenerationCore
from edgeagent.server.openai.errors import error_response, invalid_body, not_routed
from edgeagent.server.openai.requests import ChatRequest, CompletionRequest
from edgeagent.server.openai.serve import Generation


def create_app(core: GenerationCore, api_token: str | None = None,
               max_body_bytes: int | None = None,
               write_timeout_s: float | None = None) -> FastAPI:  # fmt: skip
    """The app for one listener; with `api_token`, every call but /health and /ready must
    carry it as `Authorization: Bearer ...` (the TCP rule gRPC follows)."""
    app = FastAPI(title="edgeagent", docs_url=None, redoc_url=None, openapi_url=None)
    guarded = [Depends(_bearer(api_token))] if api_token else []
    generation, slot = Generation(core, write_timeout_s), core.slot

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: ChatRequest, request: Request) -> Response:
        _check_model(slot, body.model)
        return await generation.serve(body, request, chat=True)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_model(slot, body.model)
        return await generation.serve(body, request, chat=False)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        serving = slot.current()
        return {"object": "list", "data": [{
            "id": serving.model_id, "object": "model", "created": 0, "owned_by": "edgeagent",
            "version": serving.version, "max_model_len": serving.engine.facts.max_model_len,
        }]}  # fmt: skip

    @app.get("/health")
    async def health() -> Response:
        alive = slot.serving is not None
        return JSONResponse({"status": "ok" if alive else slot.why_empty},
                            status_code=200 if alive else 503)  # fmt: skip

    @app.get("/ready")
    async def ready() -> Response:
        return JSONResponse({"state": slot.state}, status_code=200 if slot.accepting else 503)

    app.add_exception_handler(EdgeAgentError, _edgeagent_error)
    app.add_exception_handler(RequestValidationError, invalid_body)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, not_routed)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _edgeagent_error)  # unexpected: 500, logged
    if max_body_bytes is not None:
        app.add_middleware(_BodyLimit, limit=max_body_bytes)
    return app


async def _edgeagent_error(request: Request, exc: Exception) -> Response:
    return error_response(http_error_for(exc))


def _check_model(slot: ServingSlot, model: str | None) -> None:
    serving = slot.current()
    if model and model not in (serving.model_id, serving.version):
        raise NotFoundError(
            f"model: {model!r} is not served here; this server serves {serving.model_id!r} "
            f"(GET /v1/models)"
        )


def _bearer(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    async def check(authorization: str | None = Header(default=None)) -> None:
        if authorization is None or not hmac.compare_digest(authorization.encode(), expected):
            raise UnauthenticatedError("a valid bearer token is required (Authorization header)")

    return check


class _BodyLimit:
    """ASGI middleware: a body past `limit` is refused with 413 (gRPC's `max_message_bytes`, for
    the same server): by its Content-Length before it is read, or, sent in chunks without one,
    as soon as what arrived passes the limit (a chunked body is read here, then handed on)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app, self._limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if length.isdigit() and int(length) > self._limit:
                await self._refuse(f"the body is {length} bytes", scope, receive, send)
                return
            await self._app(scope, receive, send)
            return
        body, first = bytearray(), await receive()
        message = first
        while message["type"] == "http.request":
            body += message.get("body", b"")
            if len(body) > self._limit:
                await self._refuse(f"the body passed {len(body)} bytes", scope, receive, send)
                return
            if not message.get("more_body", False):
                break
            message = await receive()
        await self._app(scope, _replay(bytes(body), message, receive), send)

    async def _refuse(self, what: str, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = ResourceExhaustedError(f"{what}; the limit is {self._limit} bytes")
        await error_response(http_error_for(refusal))(scope, receive, send)


def _replay(body: bytes, last: Message, receive: Receive) -> Receive:
    """`receive` for the app: the body read ahead as one message (or the disconnect that cut
    it short), then the connection's own messages."""
    replayed = False

    async def replaying() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        if last["type"] != "http.request":
            return last
        return {"type": "http.request", "body": body, "more_body": False}

    return replaying
