"""Assemble the gRPC server: the generation service, standard health, reflection, listeners."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgeagent.errors import ConfigError
from edgeagent.server.admin import SERVICE_NAME as ADMIN_SERVICE_NAME
from edgeagent.server.admin import AdminService
from edgeagent.server.admin import add_to_server as add_admin_to_server
from edgeagent.server.service import GenerationService
from edgeagent.settings import ServerSettings
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
_HEALTH_NAMES = ("", SERVICE_NAME)


class ApiServer:
    """The listening gRPC server and its health status."""

    def __init__(
        self,
        service: GenerationService,
        settings: ServerSettings,
        socket_path: Path,
        admin: AdminService | None = None,
    ) -> None:
        self._settings = settings
        self.socket_path = socket_path
        limit = settings.max_message_bytes
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
        )
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        pb_grpc.add_GenerationServiceServicer_to_server(  # type: ignore[no-untyped-call]
            service, self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
        if admin is not None:
            add_admin_to_server(admin, self._server)
            names.append(ADMIN_SERVICE_NAME)
        reflection.enable_server_reflection(names, self._server)
        self.tcp_port: int | None = None

    async def start(self) -> None:
        """Listen on the Unix socket (and TCP if configured); health stays NOT_SERVING."""
        for name in _HEALTH_NAMES:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._bind_unix_socket()
        if self._settings.tcp_address:
            self.tcp_port = self._server.add_insecure_port(self._settings.tcp_address)
            if self.tcp_port == 0:
                raise ConfigError(f"cannot listen on {self._settings.tcp_address}")
            logger.info("listening on tcp %s (port %d)", self._settings.tcp_address, self.tcp_port)
        # The socket file is created with the umask's mode: never wider than the configured one.
        old_umask = os.umask(0o777 & ~self._settings.socket_mode)
        try:
            await self._server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, self._settings.socket_mode)
        logger.info(
            "listening on unix socket %s (mode %o)", self.socket_path, self._settings.socket_mode
        )

    def _bind_unix_socket(self) -> None:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            if _socket_accepts(path):
                raise ConfigError(f"another server is listening on {path}")
            path.unlink()  # left behind by a process that died
        elif path.exists():
            raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
        if self._server.add_insecure_port(f"unix:{path}") == 0:
            raise ConfigError(f"cannot listen on unix socket {path}")

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse
        for name in _HEALTH_NAMES:
            await self._health.set(name, status.SERVING if serving else status.NOT_SERVING)

    async def enter_graceful_shutdown(self) -> None:
        """Health NOT_SERVING for good: later `set_serving` calls are ignored."""
        await self._health.enter_graceful_shutdown()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)
        if self.socket_path.is_socket():
            self.socket_path.unlink()


def _socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
