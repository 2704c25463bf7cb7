"""A small client for apps: `Client().stream("Hello")`, `Client().chat([...])`.

By default it connects to the daemon's Unix socket from the same settings the daemon reads
(the admin calls: to the admin socket, `Client(default_admin_target())`). Over TCP it sends a
bearer token (`token=`, or `$EDGEAGENT_CLIENT_TOKEN`) and speaks TLS when given `Tls(...)`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeagent.v1 import admin_pb2, admin_pb2_grpc
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Parameters:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] = ()


def build_request(
    prompt: str | None = None,
    messages: Iterable[Message] | None = None,
    params: Parameters = Parameters(),
) -> pb.GenerateRequest:
    """A `GenerateRequest` from a raw prompt or chat messages; unset parameters stay unset."""
    request = pb.GenerateRequest()
    if messages is not None:
        request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    elif prompt is not None:
        request.prompt = prompt
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(params, name)
        if value is not None:
            setattr(request.sampling, name, value)
    if params.max_tokens is not None:
        request.stopping.max_tokens = params.max_tokens
    request.stopping.stop.extend(params.stop)
    return request


def describe_rpc_error(error: grpc.RpcError) -> str:
    """One line for a failed call; a daemon that is not there says so, with where to look."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in details:
        return (
            f"no edgeagent daemon answers ({details}); is it running? "
            f"(`systemctl status edgeagent`, or `edgeagent serve`)"
        )
    return f"{code.name}: {details}"


SYSTEM_RUNTIME_DIR = Path("/run/edgeagent")  # the systemd unit's RuntimeDirectory


def default_target() -> str:
    """This user's daemon socket if one is there, else the system service's."""
    from edgeagent.settings import Settings

    return _first_socket(Settings().socket_path, SYSTEM_RUNTIME_DIR / "edgeagent.sock")


def default_admin_target() -> str:
    from edgeagent.settings import Settings

    return _first_socket(Settings().admin_socket_path, SYSTEM_RUNTIME_DIR / "admin.sock")


def _first_socket(*paths: Path) -> str:
    found = next((path for path in paths if path.is_socket()), paths[0])
    return f"unix:{found}"


@dataclass(frozen=True)
class Tls:
    """PEM files: the CA that signed the server's certificate; for mutual TLS, ours too."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


class Client:
    def __init__(
        self,
        target: str | None = None,
        timeout: float | None = None,
        token: str | None = None,
        tls: Tls | None = None,
    ) -> None:
        self.target = target or default_target()
        self.timeout = timeout
        token = token or os.environ.get("EDGEAGENT_CLIENT_TOKEN")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if tls is None:
            self._channel = grpc.insecure_channel(self.target)
        else:
            self._channel = grpc.secure_channel(self.target, tls.credentials())
        self._stub = pb_grpc.GenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(
        self, prompt: str, params: Parameters = Parameters()
    ) -> Iterator[pb.GenerateStreamResponse]:
        return self.stream_request(build_request(prompt=prompt, params=params))

    def chat(
        self, messages: Iterable[Message], params: Parameters = Parameters()
    ) -> Iterator[pb.GenerateStreamResponse]:
        return self.stream_request(build_request(messages=messages, params=params))

    def stream_request(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateStreamResponse]:
        responses: Iterator[pb.GenerateStreamResponse] = self._stub.GenerateStream(
            request, timeout=self.timeout, metadata=self._metadata
        )
        return responses

    def generate(self, prompt: str, params: Parameters = Parameters()) -> pb.GenerateResponse:
        response: pb.GenerateResponse = self._stub.Generate(
            build_request(prompt=prompt, params=params),
            timeout=self.timeout,
            metadata=self._metadata,
        )
        return response

    def model_info(self) -> pb.ModelInfo:
        info: pb.ModelInfo = self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
        )
        return info

    def status(self) -> admin_pb2.Status:
        status: admin_pb2.Status = self._admin.GetStatus(
            admin_pb2.GetStatusRequest(), timeout=self.timeout, metadata=self._metadata
        )
        return status

    def update(self, version: str) -> admin_pb2.UpdateOutcome:
        """Ask the daemon to serve `version` from its store; waits for the outcome."""
        outcome: admin_pb2.UpdateOutcome = self._admin.Update(
            admin_pb2.UpdateRequest(version=version), timeout=self.timeout, metadata=self._metadata
        )
        return outcome

    def rollback(self) -> admin_pb2.UpdateOutcome:
        outcome: admin_pb2.UpdateOutcome = self._admin.Rollback(
            admin_pb2.RollbackRequest(), timeout=self.timeout, metadata=self._metadata
        )
        return outcome

    def is_serving(self) -> bool:
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_until_serving(
        self, timeout: float, daemon: subprocess.Popen[bytes] | None = None
    ) -> None:
        """Poll health until SERVING; fail early if `daemon` (the server's process) exits."""
        deadline = time.monotonic() + timeout
        while not self.is_serving():
            if daemon is not None and daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with code {daemon.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} not serving after {timeout:g} s")
            time.sleep(0.25)
