"""Ending an RPC with the status `server/error_codes.py` gives an error."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from edgeagent.errors import ResourceExhaustedError
from edgeagent.server.error_codes import Status, status_for

Context = grpc.aio.ServicerContext[object, object]
RETRY_AFTER_KEY = "retry-after-ms"


def grpc_code(status: Status) -> grpc.StatusCode:
    return grpc.StatusCode[status.name]


@contextlib.asynccontextmanager
async def errors_as_status(
    context: Context, on_status: Callable[[str], None] | None = None
) -> AsyncIterator[None]:
    """End the RPC with the status for any error raised inside (aborts pass through);
    `on_status` hears the final code's name (for metrics)."""
    report = on_status or (lambda code: None)
    try:
        yield
    except grpc.aio.AbortError:
        report(Status.UNKNOWN.name)
        raise
    except Exception as exc:
        report(status_for(exc)[0].name)
        await abort_with(context, exc)
    except BaseException:  # the client went away: asyncio cancels the handler
        report(Status.CANCELLED.name)
        raise
    else:
        report(Status.OK.name)


async def abort_with(context: Context, exc: BaseException) -> None:
    """End the RPC with the status for `exc` (raises, as `context.abort` does); a refusal for
    load says when to retry in the trailing metadata (`retry-after-ms`)."""
    status, message = status_for(exc)
    if isinstance(exc, ResourceExhaustedError) and exc.retry_after_s is not None:
        hint_ms = str(round(exc.retry_after_s * 1000))
        context.set_trailing_metadata(((RETRY_AFTER_KEY, hint_ms),))
    await context.abort(grpc_code(status), message)
