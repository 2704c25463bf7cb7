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
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeagent.v1 import admin_pb2, admin_pb2_grpc
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from edgeagent.settings import Settings

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Parameters:
    """What a `GenerateRequest` asks for besides its input; None (or empty, or False) leaves a
    field unset, so the server's default applies. The fields are documented in docs/api.md."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    _: KW_ONLY
    # sampling
    repetition_penalty: float | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # stopping
    min_tokens: int | None = None
    time_limit_ms: int | None = None
    include_stop_sequence: bool = False
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    # the request
    n: int | None = None
    priority: int | None = None
    max_queue_ms: int | None = None
    # token details: None none; 0 each generated token's id, text and log-probability; k > 0
    # also its k most likely alternatives (at most the server's limits.max_top_n_tokens)
    logprobs: int | None = None
    prompt_logprobs: bool = False  # the prompt's tokens too (with logprobs' alternatives)
    # a constraint on the output: at most one of these
    json_schema: str | None = None  # a JSON Schema as JSON text
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] = ()
    grammar: str | None = None  # EBNF (GBNF) or Lark

    def constraints(self) -> list[str]:
        """The names of the constraint fields that are set."""
        set_ = {
            "json_schema": self.json_schema is not None,
            "json_object": self.json_object,
            "regex": self.regex is not None,
            "choice": bool(self.choice),
            "grammar": self.grammar is not None,
        }
        return [name for name, is_set in set_.items() if is_set]


_SAMPLING = (
    "temperature", "top_p", "top_k", "seed",
    "repetition_penalty", "min_p", "presence_penalty", "frequency_penalty",
)  # fmt: skip


def build_request(
    prompt: str | None = None,
    messages: Iterable[Message] | None = None,
    params: Parameters = Parameters(),
) -> pb.GenerateRequest:
    """A `GenerateRequest` from a raw prompt or chat messages; unset parameters stay unset.
    Raises ValueError when `params` sets more than one constraint."""
    constraints = params.constraints()
    if len(constraints) > 1:
        raise ValueError(f"at most one constraint per request; got {', '.join(constraints)}")
    request = pb.GenerateRequest()
    if messages is not None:
        request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    elif prompt is not None:
        request.prompt = prompt
    for name in _SAMPLING:
        value = getattr(params, name)
        if value is not None:
            setattr(request.sampling, name, value)
    _set_stopping(request.stopping, params)
    if params.n is not None:
        request.n = params.n
    if params.priority is not None:
        request.priority = params.priority
    if params.max_queue_ms is not None:
        request.max_queue_ms = params.max_queue_ms
    if params.logprobs is not None:
        request.response.generated_tokens = True
        request.response.top_n_tokens = params.logprobs
    if params.prompt_logprobs:
        request.response.input_tokens = True
    _set_constraint(request.constraint, params)
    return request


def _set_stopping(stopping: pb.StoppingCriteria, params: Parameters) -> None:
    if params.max_tokens is not None:
        stopping.max_tokens = params.max_tokens
    if params.stop:
        stopping.stop.extend(_strings("stop", params.stop))
    if params.min_tokens is not None:
        stopping.min_tokens = params.min_tokens
    if params.time_limit_ms is not None:
        stopping.time_limit_ms = params.time_limit_ms
    if params.include_stop_sequence:
        stopping.include_stop_sequence = True
    if params.stop_token_ids:
        stopping.stop_token_ids.extend(params.stop_token_ids)
    if params.ignore_eos:
        stopping.ignore_eos = True


def _set_constraint(constraint: pb.Constraint, params: Parameters) -> None:
    if params.json_schema is not None:
        constraint.json_schema = params.json_schema
    elif params.json_object:
        constraint.json_object = True
    elif params.regex is not None:
        constraint.regex = params.regex
    elif params.choice:
        constraint.choice.choices.extend(_strings("choice", params.choice))
    elif params.grammar is not None:
        constraint.grammar = params.grammar


def _strings(name: str, values: Sequence[str]) -> Sequence[str]:
    """A sequence of strings, not one string (whose characters would each become one)."""
    if isinstance(values, str):
        raise TypeError(f"{name} takes a sequence of strings, not one string: [{values!r}]")
    return values


def describe_rpc_error(error: grpc.RpcError) -> str:
    """One line for a failed call; a daemon that is not there says so, with where to look."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in details:
        return (
            f"no edgeagent daemon answers ({details}); is it running? "
            f"(`systemctl status edgeagent`, or `edgeagent serve`)"
        )
    retry = retry_after_ms(error)
    hint = f" (retry after {retry} ms)" if retry is not None else ""
    return f"{code.name}: {details}{hint}"


RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata of a RESOURCE_EXHAUSTED refusal


def retry_after_ms(error: grpc.RpcError) -> int | None:
    """When the server suggests trying again, for a refusal that has a hint."""
    try:
        trailing = error.trailing_metadata() or ()
    except AttributeError:  # an error that is no call (raised by a test, say)
        return None
    for item in trailing:
        if item.key == RETRY_AFTER_KEY:
            value: str | bytes = item.value
            text = value.decode() if isinstance(value, bytes) else value
            return int(text) if text.isdigit() else None
    return None


SYSTEM_RUNTIME_DIR = Path("/run/edgeagent")  # the systemd unit's RuntimeDirectory


def default_target() -> str:
    """This user's daemon socket if one is there, else the system service's."""
    from edgeagent.settings import Settings

    return _first_socket(Settings().socket_path, SYSTEM_RUNTIME_DIR / "edgeagent.sock")


def default_admin_target(settings: Settings | None = None) -> str:
    """This user's daemon's admin socket (by `settings`, or read now) if there, else the
    system service's."""
    from edgeagent.settings import Settings

    admin_socket = (settings or Settings()).admin_socket_path
    return _first_socket(admin_socket, SYSTEM_RUNTIME_DIR / "admin.sock")


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
        return self.generate_request(build_request(prompt=prompt, params=params))

    def generate_request(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        response: pb.GenerateResponse = self._stub.Generate(
            request, timeout=self.timeout, metadata=self._metadata
        )
        return response

    def model_info(self) -> pb.ModelInfo:
        info: pb.ModelInfo = self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
        )
        return info

    def server_info(self) -> pb.ServerInfo:
        """The model, the engine's configuration and load now, and the request limits."""
        info: pb.ServerInfo = self._stub.GetServerInfo(
            pb.GetServerInfoRequest(), timeout=self.timeout, metadata=self._metadata
        )
        return info

    def tokenize(
        self,
        prompt: str | None = None,
        messages: Iterable[Message] | None = None,
        return_tokens: bool = False,
    ) -> pb.TokenizeResponse:
        """The token ids of a raw prompt or chat messages, as Generate would send them."""
        request = pb.TokenizeRequest(return_tokens=return_tokens)
        if messages is not None:
            request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
        elif prompt is not None:
            request.prompt = prompt
        response: pb.TokenizeResponse = self._stub.Tokenize(
            request, timeout=self.timeout, metadata=self._metadata
        )
        return response

    def detokenize(
        self, ids: Iterable[int], skip_special_tokens: bool = False
    ) -> pb.DetokenizeResponse:
        response: pb.DetokenizeResponse = self._stub.Detokenize(
            pb.DetokenizeRequest(token_ids=ids, skip_special_tokens=skip_special_tokens),
            timeout=self.timeout,
            metadata=self._metadata,
        )
        return response

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
