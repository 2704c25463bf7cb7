"""Turn a `GenerateRequest` into token ids and sampling options, or say exactly what is wrong.

Every check runs here, before the engine sees the request; cheap checks come first so an
oversized prompt is refused before it is tokenized. Messages name the field and the limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from edgeagent.engine.interface import Engine, SamplingOptions
from edgeagent.errors import InvalidRequestError
from edgeagent.settings import LimitSettings
from edgeagent.v1 import generation_pb2 as pb

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PreparedRequest:
    prompt_token_ids: list[int]
    options: SamplingOptions

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def prepare_request(
    request: pb.GenerateRequest, engine: Engine, limits: LimitSettings
) -> PreparedRequest:
    """Check `request` against `limits` and the model's context; tokenize its input."""
    sampling = _sampling(request.sampling)
    stop = _stop_sequences(request.stopping, limits)
    prompt_token_ids = _prompt_ids(request, engine, limits)
    max_tokens = _max_tokens(
        request.stopping, len(prompt_token_ids), engine.facts.max_model_len, limits
    )
    return PreparedRequest(prompt_token_ids, replace(sampling, max_tokens=max_tokens, stop=stop))


def _prompt_ids(request: pb.GenerateRequest, engine: Engine, limits: LimitSettings) -> list[int]:
    kind = request.WhichOneof("input")
    if kind == "prompt":
        _check_size("prompt", len(request.prompt.encode()), limits.max_input_bytes)
        if not request.prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        return engine.encode(request.prompt)
    if kind == "chat":
        messages = request.chat.messages
        if not messages:
            raise InvalidRequestError("chat.messages", "must hold at least one message")
        if len(messages) > limits.max_messages:
            raise InvalidRequestError(
                "chat.messages", f"{len(messages)} messages; the limit is {limits.max_messages}"
            )
        size = sum(len(m.content.encode()) for m in messages)
        _check_size("chat.messages", size, limits.max_input_bytes)
        for index, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequestError(
                    f"chat.messages[{index}].role",
                    f"unknown role {message.role!r}; expected one of {', '.join(CHAT_ROLES)}",
                )
        return engine.encode_chat(messages)
    raise InvalidRequestError("input", "give either a prompt or chat messages")


def _check_size(field: str, size: int, limit: int) -> None:
    if size > limit:
        raise InvalidRequestError(field, f"{size} bytes; the limit is {limit} bytes")


def _sampling(sampling: pb.SamplingParameters) -> SamplingOptions:
    """The sampling options; max_tokens and stop are filled in by the caller."""
    temperature = sampling.temperature if sampling.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequestError("sampling.temperature", f"must be >= 0; got {temperature}")
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if not (0 < top_p <= 1):
        raise InvalidRequestError("sampling.top_p", f"must be in (0, 1]; got {top_p}")
    top_k = sampling.top_k if sampling.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidRequestError("sampling.top_k", f"must be >= 0 (0: off); got {top_k}")
    seed = sampling.seed if sampling.HasField("seed") else None
    return SamplingOptions(
        max_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )


def _stop_sequences(stopping: pb.StoppingCriteria, limits: LimitSettings) -> tuple[str, ...]:
    if len(stopping.stop) > limits.max_stop_sequences:
        raise InvalidRequestError(
            "stopping.stop",
            f"{len(stopping.stop)} stop sequences; the limit is {limits.max_stop_sequences}",
        )
    for index, stop in enumerate(stopping.stop):
        if not stop:
            raise InvalidRequestError(f"stopping.stop[{index}]", "must not be empty")
        _check_size(f"stopping.stop[{index}]", len(stop.encode()), limits.max_stop_sequence_bytes)
    return tuple(stopping.stop)


def _max_tokens(
    stopping: pb.StoppingCriteria, prompt_tokens: int, context: int, limits: LimitSettings
) -> int:
    room = context - prompt_tokens
    if room <= 0:
        raise InvalidRequestError(
            "prompt",
            f"{prompt_tokens} tokens; the context holds {context} tokens, prompt and answer",
        )
    if not stopping.HasField("max_tokens"):
        return min(limits.default_max_tokens, room)
    max_tokens = stopping.max_tokens
    if max_tokens <= 0:
        raise InvalidRequestError("stopping.max_tokens", f"must be > 0; got {max_tokens}")
    if max_tokens > room:
        raise InvalidRequestError(
            "stopping.max_tokens",
            f"{max_tokens} plus the prompt's {prompt_tokens} tokens exceeds the context of "
            f"{context} tokens; at most {room}",
        )
    return max_tokens
