"""The one place where edgeagent's errors become statuses: each error's canonical status (named
as gRPC's codes are, which `server/grpc_errors.py` converts by name), and its HTTP status and
OpenAI error `type` for the OpenAI-compatible API."""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field

from edgeagent.errors import (
    ClientTooSlowError,
    ConfigError,
    EdgeAgentError,
    EngineDeadError,
    InvalidRequestError,
    NotFoundError,
    RequestCancelledError,
    ResourceExhaustedError,
    SignatureError,
    UnauthenticatedError,
    UnavailableError,
    UpdateRefusedError,
)

logger = logging.getLogger(__name__)


class Status(enum.Enum):
    """How a request ended, in the canonical codes' names (gRPC's `StatusCode` has each)."""

    OK = enum.auto()
    CANCELLED = enum.auto()
    UNKNOWN = enum.auto()
    INVALID_ARGUMENT = enum.auto()
    DEADLINE_EXCEEDED = enum.auto()
    NOT_FOUND = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    FAILED_PRECONDITION = enum.auto()
    UNAVAILABLE = enum.auto()
    UNAUTHENTICATED = enum.auto()
    INTERNAL = enum.auto()


INVALID_REQUEST = (400, "invalid_request_error")
UNAVAILABLE = (503, "service_unavailable_error")
INTERNAL = (500, "internal_server_error")

# Each error: its status, and its HTTP status and OpenAI error type. The first match wins.
_TABLE: tuple[tuple[type[EdgeAgentError], Status, tuple[int, str]], ...] = (
    (InvalidRequestError, Status.INVALID_ARGUMENT, INVALID_REQUEST),
    (ResourceExhaustedError, Status.RESOURCE_EXHAUSTED, (429, "rate_limit_error")),
    (ClientTooSlowError, Status.DEADLINE_EXCEEDED, (408, "timeout_error")),
    (UnavailableError, Status.UNAVAILABLE, UNAVAILABLE),
    (RequestCancelledError, Status.UNAVAILABLE, UNAVAILABLE),
    (EngineDeadError, Status.UNAVAILABLE, UNAVAILABLE),
    (ConfigError, Status.FAILED_PRECONDITION, INVALID_REQUEST),
    (UpdateRefusedError, Status.FAILED_PRECONDITION, INVALID_REQUEST),
    (SignatureError, Status.FAILED_PRECONDITION, (403, "permission_error")),  # not trusted
    (NotFoundError, Status.NOT_FOUND, (404, "not_found_error")),
    (UnauthenticatedError, Status.UNAUTHENTICATED, (401, "authentication_error")),
)
# A request too big as it is (a refusal without a retry hint): retrying will not help, and
# OpenAI's clients read `rate_limit_error` as "retry later".
TOO_LARGE = (413, "invalid_request_error")


@dataclass(frozen=True)
class HttpError:
    """What an error becomes over HTTP: status, OpenAI error body fields, and headers."""

    status: int
    type: str
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def status_for(exc: BaseException) -> tuple[Status, str]:
    """The status and client-facing message for `exc`; unknown errors say nothing inside."""
    status, _, message = _mapped(exc)
    return status, message


def http_error_for(exc: BaseException) -> HttpError:
    """The HTTP status, OpenAI error type and headers for `exc`, from the same table as its
    status; a refusal for load says when to retry in `Retry-After` (whole seconds, at least 1)."""
    _, (status, kind), message = _mapped(exc)
    headers = {}
    if isinstance(exc, ResourceExhaustedError):
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        else:
            status, kind = TOO_LARGE
    param = exc.field if isinstance(exc, InvalidRequestError) else None
    return HttpError(status, kind, message, param, headers)


def _mapped(exc: BaseException) -> tuple[Status, tuple[int, str], str]:
    for kind, status, http in _TABLE:
        if isinstance(exc, kind):
            return status, http, str(exc)
    if isinstance(exc, EdgeAgentError):
        return Status.INTERNAL, INTERNAL, str(exc)
    logger.error("unexpected error while serving a request", exc_info=exc)
    return Status.INTERNAL, INTERNAL, "internal error; see the server log"
