"""The one place where edgeagent's errors become gRPC status codes, and HTTP statuses for the
OpenAI-compatible API."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from edgeagent.errors import (
    ClientTooSlowError,
    ConfigError,
    EdgeAgentError,
    EngineDeadError,
    InvalidRequestError,
    NotFoundError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UpdateRefusedError,
)

logger = logging.getLogger(__name__)

_CODES: tuple[tuple[type[EdgeAgentError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ClientTooSlowError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (RequestCancelledError, grpc.StatusCode.UNAVAILABLE),
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (UpdateRefusedError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
)


# HTTP status and OpenAI error `type` for each gRPC code.
_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (408, "timeout_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
}


@dataclass(frozen=True)
class HttpError:
    """What an error becomes over HTTP: status, OpenAI error body fields, and headers."""

    status: int
    type: str
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def http_error_for(exc: BaseException) -> HttpError:
    """The HTTP status, OpenAI error type and headers for `exc`, from the same table as gRPC's;
    a refusal for load says when to retry in `Retry-After` (whole seconds, at least 1)."""
    code, message = status_for(exc)
    status, kind = _HTTP.get(code, (500, "internal_server_error"))
    headers = {}
    if isinstance(exc, ResourceExhaustedError):
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        else:
            status = 413  # too big as it is: retrying will not help
    param = exc.field if isinstance(exc, InvalidRequestError) else None
    return HttpError(status, kind, message, param, headers)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for `exc`; unknown errors say nothing inside."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, EdgeAgentError):
        return grpc.StatusCode.INTERNAL, str(exc)
    logger.error("unexpected error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


Context = grpc.aio.ServicerContext[object, object]


@contextlib.asynccontextmanager
async def errors_as_status(
    context: Context, on_status: Callable[[grpc.StatusCode], None] | None = None
) -> AsyncIterator[None]:
    """End the RPC with the status for any error raised inside (aborts pass through);
    `on_status` hears the final code (for metrics)."""
    report = on_status or (lambda code: None)
    try:
        yield
    except grpc.aio.AbortError:
        report(grpc.StatusCode.UNKNOWN)
        raise
    except Exception as exc:
        report(status_for(exc)[0])
        await abort_with(context, exc)
    except BaseException:  # the client went away: asyncio cancels the handler
        report(grpc.StatusCode.CANCELLED)
        raise
    else:
        report(grpc.StatusCode.OK)


RETRY_AFTER_KEY = "retry-after-ms"


async def abort_with(context: grpc.aio.ServicerContext[object, object], exc: BaseException) -> None:
    """End the RPC with the status for `exc` (raises, as `context.abort` does); a refusal for
    load says when to retry in the trailing metadata (`retry-after-ms`)."""
    code, message = status_for(exc)
    if isinstance(exc, ResourceExhaustedError) and exc.retry_after_s is not None:
        hint_ms = str(round(exc.retry_after_s * 1000))
        context.set_trailing_metadata(((RETRY_AFTER_KEY, hint_ms),))
    await context.abort(code, message)
