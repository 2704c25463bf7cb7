"""The serving core's own request and result types, which both transports map into and out of
(gRPC in `server/grpc_mapping.py`, the OpenAI API in `server/openai/requests.py`).

A request is as the client sent it, unchecked: None is "not given" (the server's default
applies), and `server/requests.py` checks every field before the engine sees it. Field names
follow the gRPC API's, which is what the checks' messages name (the OpenAI side renames them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeagent.engine.interface import Delta, TokenDetail


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class PromptInput:
    """A raw prompt or chat messages; neither given is refused, as is an empty one given."""

    prompt: str | None = None
    chat: tuple[ChatMessage, ...] | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass(frozen=True)
class Stopping:
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    time_limit_ms: int = 0  # 0: no limit
    include_stop_sequence: bool = False
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenOptions:
    """Which token details to return: generated tokens, prompt tokens, alternatives of each."""

    generated_tokens: bool = False
    input_tokens: bool = False
    top_n_tokens: int = 0


@dataclass(frozen=True)
class RequestedConstraint:
    """What the output must match, as asked: exactly one field is given (else refused)."""

    json_schema: str | None = None  # JSON text
    json_object: bool | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    @property
    def given(self) -> list[str]:
        names = ("json_schema", "json_object", "regex", "choice", "grammar")
        return [name for name in names if getattr(self, name) is not None]


@dataclass(frozen=True)
class GenerationRequest:
    input: PromptInput
    sampling: Sampling = Sampling()
    stopping: Stopping = Stopping()
    token_options: TokenOptions = TokenOptions()
    constraint: RequestedConstraint | None = None
    n: int | None = None
    priority: int = 0
    max_queue_ms: int = 0  # 0: wait


@dataclass(frozen=True)
class Usage:
    cached_prompt_tokens: int
    time_to_first_token_ms: float
    total_time_ms: float


@dataclass
class CompletionParts:
    """One completion of a unary request, gathered delta by delta."""

    index: int
    texts: list[str] = field(default_factory=list)
    tokens: list[TokenDetail] = field(default_factory=list)
    last: Delta | None = None

    def add(self, delta: Delta) -> None:
        self.texts.append(delta.text)
        self.tokens += delta.tokens
        self.last = delta

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def final(self) -> Delta:
        """The last delta: the completion's counts, finish reason and stop sequence."""
        return self.last or Delta("", 0, index=self.index)
