"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from edgeagent.server.error_codes import HttpError
from edgeagent.server.openai.requests import UNSUPPORTED, openai_param

MESSAGES = {404: ("not_found_error", "no such endpoint"), 405: ("invalid_request_error",
            "method not allowed")}  # fmt: skip


def error_body(error: HttpError) -> dict[str, object]:
    param = openai_param(error.param) if error.param else None
    message = error.message
    if error.param and param and message.startswith(error.param):
        message = param + message[len(error.param) :]
    return {"error": {"message": message, "type": error.type, "param": param, "code": None}}


def error_response(error: HttpError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body pydantic refused: 400 naming the first field at fault."""
    first = exc.errors()[0]
    param = _path(first["loc"][1:])
    if first["type"] == "json_invalid":
        message = "the body is not valid JSON"
    elif first["type"] == "extra_forbidden":
        top = str(first["loc"][1]) if len(first["loc"]) > 1 else param
        known = param in UNSUPPORTED or top in UNSUPPORTED
        message = f"{param}: {'not supported by edgeagent' if known else 'unknown field'}"
    else:
        message = f"{param}: {first['msg']}"
    return error_response(HttpError(400, "invalid_request_error", message, param or None))


async def not_routed(request: Request, exc: HTTPException) -> JSONResponse:
    kind, message = MESSAGES.get(exc.status_code, ("invalid_request_error", str(exc.detail)))
    error = HttpError(exc.status_code, kind, f"{request.method} {request.url.path}: {message}")
    return error_response(error)


def _path(loc: tuple[object, ...] | list[object]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text
