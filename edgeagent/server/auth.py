"""Who may call gRPC over TCP: TLS (optionally mutual) credentials, and bearer tokens checked
by an interceptor (the rules shared with the HTTP listener are `exposure.py`'s).

The Unix sockets need neither: the kernel refuses a connection from a process outside the
socket's owner and group. Over TCP every call but the standard health check must carry
`authorization: Bearer <token>` when a token is configured; the admin service has its own token
and is not served over TCP without one. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health

from edgeagent.server.admin import SERVICE_NAME as ADMIN_SERVICE_NAME
from edgeagent.server.exposure import tls_files
from edgeagent.settings import ServerSettings

logger = logging.getLogger(__name__)

HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"
ADMIN_PREFIX = f"/{ADMIN_SERVICE_NAME}/"
DENIED = "missing or wrong bearer token (metadata `authorization: Bearer <token>`)"


if TYPE_CHECKING:  # generic only in grpc's type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler, Interceptor = grpc.RpcMethodHandler, grpc.aio.ServerInterceptor


class BearerTokenInterceptor(Interceptor):
    def __init__(self, api_token: str | None, admin_token: str | None) -> None:
        self._api_token, self._admin_token = api_token, admin_token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        required = self._admin_token if method.startswith(ADMIN_PREFIX) else self._api_token
        if required is None or _presented_matches(details, required):
            return handler
        logger.warning("refused %s: %s", method, "missing or wrong bearer token")
        return _denying(handler)


def _presented_matches(details: grpc.HandlerCallDetails, required: str) -> bool:
    metadata = details.invocation_metadata or ()
    values = [str(value) for key, value in metadata if key == "authorization"]
    if len(values) != 1 or not values[0].startswith("Bearer "):
        return False
    return hmac.compare_digest(values[0].removeprefix("Bearer ").encode(), required.encode())


def _denying(handler: Handler) -> Handler:
    """A handler of the same shape that ends the call with UNAUTHENTICATED."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    async def streaming(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
        yield  # pragma: no cover  # makes this an async generator

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming, **codecs)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **codecs)
    return grpc.stream_stream_rpc_method_handler(streaming, **codecs)


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """gRPC's TLS credentials for the TCP listener when a certificate is configured; mutual TLS
    (a client certificate signed by `tls_client_ca_file` required) when that is set too."""
    files = tls_files(settings)
    if files is None:
        return None
    return grpc.ssl_server_credentials(
        [(files.key, files.cert)],
        root_certificates=files.client_ca,
        require_client_auth=files.client_ca is not None,
    )
