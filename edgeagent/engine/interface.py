"""What the rest of edgeagent needs of an engine, and the values that cross that line.

`VllmEngine` (vllm_engine.py) is the real one; the fast tests drive a fake with the same
interface. Nothing here imports vLLM.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    kv_cache_bytes: int
    max_num_seqs: int
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None  # vLLM checks it against free memory at start
    dtype: str = "auto"
    enforce_eager: bool = False


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # the sampled tokens' log-probabilities in each delta


class FinishReason(enum.Enum):
    MAX_TOKENS = "max_tokens"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    TOKEN_LIMIT = "token_limit"


@dataclass(frozen=True)
class Delta:
    """Text produced since the last delta; counts are totals so far."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None
    logprobs: tuple[float, ...] = ()  # of this delta's tokens, when asked for


@dataclass(frozen=True)
class EngineLoad:
    """The engine's own view of its work, from its last scheduling step."""

    running: int = 0  # requests in the batch
    waiting: int = 0  # requests queued inside the engine
    kv_cache_usage: float = 0.0  # share of the KV cache's blocks in use, 0 to 1


@dataclass(frozen=True)
class ModelFacts:
    """What the served model is, as the engine loaded it."""

    path: Path
    max_model_len: int
    max_num_seqs: int
    architecture: str
    quantization: str


class ChatMessage(Protocol):
    role: str
    content: str


class Engine(Protocol):
    """What the server and the daemon need of an engine; `VllmEngine` is the real one."""

    facts: ModelFacts

    def encode(self, text: str) -> list[int]:
        """A raw prompt's token ids; special-token strings in it are control tokens (the
        caller writes its own template)."""
        ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The chat as the model's template renders it, ready for an answer. Message contents
        are data: special-token strings in them are encoded as text, never as control tokens
        (a user cannot open a system turn)."""
        ...

    def stream(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncGenerator[Delta, None]: ...
    async def abort(self, request_id: str) -> None: ...
    async def check_health(self) -> None: ...
    def num_unfinished_requests(self) -> int: ...
    def load(self) -> EngineLoad: ...
    async def reload_weights(self, weights_path: Path) -> None: ...
    def shutdown(self) -> None: ...


EngineFactory = Callable[[EngineConfig], Engine]
