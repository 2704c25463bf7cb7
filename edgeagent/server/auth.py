"""Who may call over TCP: TLS (optionally mutual) and bearer tokens checked by an interceptor.

The Unix sockets need neither: the kernel refuses a connection from a process outside the
socket's owner and group. Over TCP every call but the standard health check must carry
`authorization: Bearer <token>` when a token is configured; the admin service has its own token
and is not served over TCP without one. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health

from edgeagent.errors import ConfigError
from edgeagent.server.admin import SERVICE_NAME as ADMIN_SERVICE_NAME
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


def check_tcp_callers(settings: ServerSettings, api_token: str | None) -> None:
    """Every TCP caller must prove who it is: with the bearer token, or a client certificate
    from our CA (mutual TLS). TLS alone only hides the traffic; without TLS the token crosses
    the network in clear, which only loopback may allow."""
    check_tcp_address(settings, api_token, settings.tcp_address, "server.tcp_address")


def check_tcp_address(
    settings: ServerSettings, api_token: str | None, address: str | None, name: str
) -> None:
    """The rules of `check_tcp_callers` for the TCP listener `address` (setting `name`)."""
    if address is None:
        return
    if api_token is None and settings.tls_client_ca_file is None:
        raise ConfigError(
            f"{name} {address} lets anyone call: set an api_token "
            f"credential (bearer token) or mutual TLS (server.tls_client_ca_file with "
            f"server.tls_cert_file and tls_key_file)"
        )
    if settings.tls_cert_file is None and not _is_loopback(address):
        raise ConfigError(
            f"{name} {address} is reachable from the network without TLS: anyone "
            f"on it could read the bearer token; set server.tls_cert_file and tls_key_file, "
            f"or listen on 127.0.0.1"
        )


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name (or "" for every address): not known to stay on this box
        return False


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the TCP listener when a certificate is configured; mutual TLS (a
    client certificate signed by `tls_client_ca_file` required) when that is set too. The files
    are read and the key checked against the certificate here, so a bad pair fails at start."""
    if settings.tls_cert_file is None:
        if settings.tls_client_ca_file is not None:
            raise ConfigError("server.tls_client_ca_file needs server.tls_cert_file/tls_key_file")
        return None
    if settings.tls_key_file is None:
        raise ConfigError("server.tls_cert_file needs server.tls_key_file")
    _check_pair(settings.tls_cert_file, settings.tls_key_file)
    client_ca = _read(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
    if settings.tls_client_ca_file is not None:
        _check_ca(settings.tls_client_ca_file)
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key_file), _read(settings.tls_cert_file))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _check_pair(cert: Path, key: Path) -> None:
    for path in (cert, key):
        _read(path)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as error:
        raise ConfigError(
            f"server.tls_cert_file {cert} and tls_key_file {key} are not a usable PEM pair: "
            f"{error.reason or error}"
        ) from None


def _check_ca(path: Path) -> None:
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_verify_locations(cafile=path)
    except ssl.SSLError as error:
        raise ConfigError(
            f"server.tls_client_ca_file {path} is not a PEM certificate: {error.reason or error}"
        ) from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
