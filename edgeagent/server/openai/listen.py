"""Where the OpenAI-compatible API listens: its own Unix socket beside the gRPC one (same mode
and group), and TCP only when `server.http_tcp_address` is set, under gRPC's TCP rules (TLS
from the same files, the same bearer token). uvicorn serves it inside the daemon's event loop
(vLLM's own server is FastAPI on uvicorn too); the daemon keeps its signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from edgeagent.errors import ConfigError
from edgeagent.server.exposure import check_tcp_address, tls_files
from edgeagent.server.generation import GenerationCore
from edgeagent.server.openai.app import create_app
from edgeagent.server.sockets import UnixListener
from edgeagent.settings import ServerSettings

logger = logging.getLogger(__name__)
START_WITHIN_S = 10.0


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # SIGTERM and SIGINT are the daemon's: it drains, then stops this server


class HttpApi:
    def __init__(self, core: GenerationCore, settings: ServerSettings, socket_path: Path,
                 api_token: str | None = None) -> None:  # fmt: skip
        self._core, self._settings, self._token = core, settings, api_token
        self.socket_path = socket_path
        self.tcp_port: int | None = None
        self._running: list[tuple[_InLoopServer, asyncio.Task[None]]] = []

    async def start(self) -> None:
        settings = self._settings
        address = settings.http_tcp_address
        check_tcp_address(settings, self._token, address, "server.http_tcp_address")
        tls_files(settings)  # the TLS files checked as the gRPC listener checks them
        try:
            await self._serve(self._unix_socket(), token=None, tls={})
            if address is not None:
                listener = _tcp_socket(address)
                self.tcp_port = listener.getsockname()[1]
                await self._serve(listener, token=self._token, tls=_tls(settings))
                logger.info("OpenAI-compatible HTTP on tcp %s (port %d)", address, self.tcp_port)
        except BaseException:
            await self.stop(grace_s=0)
            raise

    def _unix_socket(self) -> socket.socket:
        settings = self._settings
        unix = UnixListener(self.socket_path, settings.socket_mode, settings.socket_group)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with unix.creating():
                listener.bind(str(unix.path))
            unix.restrict("OpenAI-compatible HTTP")
        except BaseException:
            listener.close()
            raise
        return listener

    async def _serve(self, listener: socket.socket, token: str | None, tls: dict[str, Any]) -> None:
        settings = self._settings
        app = create_app(self._core, token, settings.max_message_bytes,
                         settings.stream_write_timeout_s)  # fmt: skip
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", **tls,
            timeout_graceful_shutdown=1, log_config=None,
        )  # fmt: skip
        server = _InLoopServer(config)
        task = asyncio.create_task(server.serve(sockets=[listener]), name="openai-http")
        self._running.append((server, task))
        async with asyncio.timeout(START_WITHIN_S):
            while not server.started:
                if task.done():
                    task.result()
                    raise ConfigError("the HTTP server stopped while starting")
                await asyncio.sleep(0.01)

    async def stop(self, grace_s: float = 1.0) -> None:
        for server, _ in self._running:
            server.should_exit = True
            server.force_exit = grace_s <= 0
        for _, task in self._running:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        self._running.clear()
        if self.socket_path.is_socket():
            self.socket_path.unlink()


def _tcp_socket(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, int(port)), family=family)
    except (OSError, ValueError) as error:
        raise ConfigError(f"server.http_tcp_address: cannot listen on {address}: {error}") from None


def _tls(settings: ServerSettings) -> dict[str, Any]:
    if settings.tls_cert_file is None:
        return {}
    tls: dict[str, Any] = {"ssl_certfile": str(settings.tls_cert_file),
                           "ssl_keyfile": str(settings.tls_key_file)}  # fmt: skip
    if settings.tls_client_ca_file is not None:
        tls |= {"ssl_ca_certs": str(settings.tls_client_ca_file),
                "ssl_cert_reqs": ssl.CERT_REQUIRED}  # fmt: skip
    return tls
