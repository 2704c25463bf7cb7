"""What the rest of edgeagent needs of an engine, and the values that cross that line.

`VllmEngine` (vllm_engine.py) is the real one; the fast tests drive a fake with the same
interface. Nothing here imports vLLM.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


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
    scheduling_policy: str = "fcfs"  # "priority": SamplingOptions.priority orders the queue
    structured_output_backend: str = "auto"
    json_max_whitespace: int = 4  # whitespace characters in a row in constrained JSON
    quantized_kernel: str = "auto"  # "marlin", "machete", or the daemon's choice
    reloads_in_place: bool = False  # updates will reload weights into it ("auto" kernel)
    cpu_quantized_kernel: str = "auto"  # "edgeagent": its CPU 4-bit kernel even where vLLM has one
    kv_cache_dtype: str = "auto"
    async_scheduling: bool | None = None
    speculative: dict[str, Any] | None = None
    # CPU: where the worker's environment is recorded, for a worker forked from a server that
    # imports beside the daemon (worker_forkserver.py); None: vLLM spawns it
    worker_record: Path | None = None


@dataclass(frozen=True)
class Constraint:
    """What the output must match; exactly one field is set."""

    json_schema: str | None = None  # JSON text
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF or Lark


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_sequence: bool = False
    min_tokens: int = 0
    ignore_eos: bool = False
    n: int = 1
    # None: no token details; 0: each generated token's id, text and log-probability; k > 0:
    # and its k most likely alternatives. prompt_logprobs: the same for the prompt's tokens.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None
    priority: int = 0  # lower first; needs EngineConfig.scheduling_policy "priority"


class FinishReason(enum.Enum):
    MAX_TOKENS = "max_tokens"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    TOKEN_LIMIT = "token_limit"
    TIME_LIMIT = "time_limit"  # set by the server, which aborts the request
    ERROR = "error"  # the engine ended the request itself, e.g. a grammar it could not compile


@dataclass(frozen=True)
class TopToken:
    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenDetail:
    """One token with what the engine said of it; logprob is None for a prompt's first."""

    id: int
    text: str
    logprob: float | None = None
    rank: int | None = None
    top: tuple[TopToken, ...] = ()


@dataclass(frozen=True)
class Delta:
    """Text one completion (`index`) produced since its last delta; counts are totals so far."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None
    tokens: tuple[TokenDetail, ...] = ()  # this delta's tokens, when logprobs were asked for
    index: int = 0
    prompt_tokens: tuple[TokenDetail, ...] = ()  # in the first delta, when asked for
    cached_prompt_tokens: int = 0  # prefix cache hits, from the first delta on

    @property
    def logprobs(self) -> tuple[float, ...]:
        return tuple(t.logprob for t in self.tokens if t.logprob is not None)


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
    vocab_size: int = 0
    prefix_caching: bool = False
    vllm_version: str = ""
    quantized_kernel: str = ""  # the 4-bit GPU matmul kernel it runs; "" off a GPU


class ChatMessage(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


class Engine(Protocol):
    """What the server and the daemon need of an engine; `VllmEngine` is the real one."""

    facts: ModelFacts
    config: EngineConfig

    def encode(self, text: str) -> list[int]:
        """A raw prompt's token ids; special-token strings in it are control tokens (the
        caller writes its own template)."""
        ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The chat as the model's template renders it, ready for an answer. Message contents
        are data: special-token strings in them are encoded as text, never as control tokens
        (a user cannot open a system turn)."""
        ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `token_ids`; an id outside the vocabulary is InvalidRequestError."""
        ...

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text."""
        ...

    def stream(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncGenerator[Delta, None]: ...
    async def abort(self, request_id: str) -> None: ...
    async def check_health(self) -> None: ...
    def num_unfinished_requests(self) -> int: ...
    def load(self) -> EngineLoad: ...
    async def reload_weights(self, weights_path: Path) -> None: ...
    async def stage_weights(self, key: str, weights_path: Path | None) -> int:
        """Stage weights in host memory while serving: a checkpoint (`weights_path`), or the
        weights serving now (None); kept under `key`. The bytes staged by this call (0: `key`
        was staged already); EngineError when the engine cannot stage them (the caller reloads
        from disk instead)."""
        ...

    async def swap_in_staged(self, key: str) -> None:
        """Copy `key`'s staged weights into the engine (no request running)."""
        ...

    async def keep_staged(self, keys: Sequence[str]) -> dict[str, int]:
        """Drop every staged set but `keys`'; the sets left and their bytes."""
        ...

    def shutdown(self) -> None: ...


EngineFactory = Callable[[EngineConfig], Engine]
