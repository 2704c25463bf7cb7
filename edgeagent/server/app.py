"""Assemble the gRPC servers: generation, admin, standard health and reflection, on their
listeners.

- the app socket (Unix, mode 0660, owned by a group for client apps): generation and health
- the admin socket (Unix, mode 0600: the service's user and root): the admin service
- TCP, only when configured: generation (and admin with its own token) behind TLS and/or a
  bearer token (`server/auth.py`); plaintext TCP without a token is refused at start
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_reflection.v1alpha import reflection

from edgeagent.errors import ConfigError
from edgeagent.server.admin import SERVICE_NAME as ADMIN_SERVICE_NAME
from edgeagent.server.admin import AdminService
from edgeagent.server.admin import add_to_server as add_admin_to_server
from edgeagent.server.auth import BearerTokenInterceptor, server_credentials
from edgeagent.server.exposure import check_tcp_callers
from edgeagent.server.health import SlotHealth
from edgeagent.server.service import GenerationService
from edgeagent.server.sockets import UnixListener
from edgeagent.settings import ServerSettings
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens for TCP callers (in clear: compare, never log)."""

    api: str | None = None
    admin: str | None = None


class ApiServer:
    """The listening gRPC servers; health is answered from the serving slot."""

    def __init__(
        self,
        service: GenerationService,
        health: SlotHealth,
        settings: ServerSettings,
        socket_path: Path,
        admin: AdminService | None = None,
        admin_socket_path: Path | None = None,
        tokens: Tokens = Tokens(),
    ) -> None:
        self._settings, self._tokens = settings, tokens
        self.socket_path, self.admin_socket_path = socket_path, admin_socket_path
        self._health, self._service, self._admin = health, service, admin
        self._servers: list[tuple[grpc.aio.Server, UnixListener | None]] = []
        self.tcp_port: int | None = None

    async def start(self) -> None:
        """Listen on the sockets (and TCP if configured); all of them, or none."""
        settings = self._settings
        if self._admin is not None and self.admin_socket_path is None:
            raise ConfigError("the admin service needs its own socket")
        check_tcp_callers(settings, self._tokens.api)
        credentials = server_credentials(settings)
        try:
            app = UnixListener(self.socket_path, settings.socket_mode, settings.socket_group)
            await self._start_unix(self._new_server(generation=True, admin=False), app)
            if self._admin is not None and self.admin_socket_path is not None:
                admin = UnixListener(self.admin_socket_path, settings.admin_socket_mode)
                await self._start_unix(self._new_server(generation=False, admin=True), admin)
            if settings.tcp_address:
                await self._start_tcp(settings.tcp_address, credentials)
        except BaseException:
            await self.stop(grace=None)
            raise

    def _new_server(
        self,
        generation: bool,
        admin: bool,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    ) -> grpc.aio.Server:
        limit = self._settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=list(interceptors),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [HEALTH_SERVICE_NAME, reflection.SERVICE_NAME]
        if generation:
            pb_grpc.add_GenerationServiceServicer_to_server(  # type: ignore[no-untyped-call]
                self._service, server
            )
            names.append(SERVICE_NAME)
        if admin and self._admin is not None:
            add_admin_to_server(self._admin, server)
            names.append(ADMIN_SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        return server

    async def _start_unix(self, server: grpc.aio.Server, listener: UnixListener) -> None:
        with listener.creating():
            if server.add_insecure_port(f"unix:{listener.path}") == 0:
                raise ConfigError(f"cannot listen on unix socket {listener.path}")
            await server.start()  # creates the socket file
        self._servers.append((server, listener))
        listener.restrict("listening")

    async def _start_tcp(self, address: str, credentials: grpc.ServerCredentials | None) -> None:
        interceptor = BearerTokenInterceptor(self._tokens.api, self._tokens.admin)
        server = self._new_server(True, self._tokens.admin is not None, [interceptor])
        if credentials is None:
            self.tcp_port = server.add_insecure_port(address)
        else:
            self.tcp_port = server.add_secure_port(address, credentials)
        if self.tcp_port == 0:
            raise ConfigError(f"cannot listen on {address}")
        await server.start()
        self._servers.append((server, None))
        logger.info(
            "listening on tcp %s (port %d; %s; bearer token %s; admin %s)", address,
            self.tcp_port, _tls_label(self._settings), "required" if self._tokens.api else "off",
            "with its token" if self._tokens.admin else "not served",
        )  # fmt: skip

    async def stop(self, grace: float | None) -> None:
        for server, listener in self._servers:
            await server.stop(grace)
            if listener is not None and listener.path.is_socket():
                listener.path.unlink()
        self._servers.clear()


def _tls_label(settings: ServerSettings) -> str:
    if settings.tls_cert_file is None:
        return "no TLS"
    return "mutual TLS" if settings.tls_client_ca_file else "TLS"
