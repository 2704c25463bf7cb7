"""Turn a `GenerationRequest` (from either transport) into token ids and sampling options, or
say exactly what is wrong.

Every check runs here, before the engine sees the request; cheap checks come first so an
oversized prompt is refused before it is tokenized. Messages name the field (by its gRPC name)
and the limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from edgeagent.engine.interface import Engine, SamplingOptions
from edgeagent.errors import InvalidRequestError
from edgeagent.server.constraints import constraint_from
from edgeagent.server.core import GenerationRequest, PromptInput, Sampling, Stopping, TokenOptions
from edgeagent.settings import LimitSettings

CHAT_ROLES = ("system", "user", "assistant")
DEADLINE_MARGIN_S = 0.05  # ends a request this much before the gRPC deadline, to answer in time
# The ranges of the API's integer fields (gRPC's types enforce them as a message is parsed).
INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)


@dataclass(frozen=True)
class PreparedRequest:
    prompt_token_ids: list[int]
    options: SamplingOptions
    time_limit_s: float | None = None  # from admission to the last token
    max_queue_s: float | None = None  # from admission to the first token

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def prepare_request(
    request: GenerationRequest,
    engine: Engine,
    limits: LimitSettings,
    deadline_s: float | None = None,
) -> PreparedRequest:
    """Check `request` against `limits` and the model's context; tokenize its input.
    `deadline_s` is the time the caller's gRPC deadline leaves, if it set one."""
    options = _with_token_options(
        _with_stopping(_sampling(request.sampling), request.stopping, limits),
        request.token_options, limits,
    )  # fmt: skip
    prompt_token_ids = _prompt_ids(request.input, engine, limits)
    max_tokens = _max_tokens(
        request.stopping, len(prompt_token_ids), engine.facts.max_model_len, limits
    )
    if options.min_tokens > max_tokens:
        raise InvalidRequestError(
            "stopping.min_tokens", f"{options.min_tokens} is more than max_tokens ({max_tokens})"
        )
    options = replace(
        options,
        max_tokens=max_tokens,
        n=_n(request, limits),
        priority=_priority(request.priority, engine),
        constraint=constraint_from(request.constraint, limits),
    )
    if options.ignore_eos and options.constraint is not None:
        raise InvalidRequestError(
            "stopping.ignore_eos", "cannot be combined with a constraint: past the constraint's "
            "end vLLM would go on generating, unconstrained"
        )  # fmt: skip
    _check_range("max_queue_ms", request.max_queue_ms, UINT32)
    max_queue_s = request.max_queue_ms / 1000 if request.max_queue_ms else None
    return PreparedRequest(
        prompt_token_ids, options, _time_limit_s(request.stopping, deadline_s), max_queue_s
    )


def tokenize(request: PromptInput, engine: Engine, limits: LimitSettings) -> list[int]:
    """The prompt's token ids, as Generate sends them to the engine."""
    return _prompt_ids(request, engine, limits)


def _prompt_ids(request: PromptInput, engine: Engine, limits: LimitSettings) -> list[int]:
    if request.prompt is not None:
        _check_size("prompt", len(request.prompt.encode()), limits.max_input_bytes)
        if not request.prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        return engine.encode(request.prompt)
    if request.chat is not None:
        messages = request.chat
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


def _sampling(sampling: Sampling) -> SamplingOptions:
    """The sampling options; the stopping and response fields are filled in by the caller."""
    temperature = sampling.temperature if sampling.temperature is not None else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequestError("sampling.temperature", f"must be >= 0; got {temperature}")
    top_p = sampling.top_p if sampling.top_p is not None else 1.0
    if not (0 < top_p <= 1):
        raise InvalidRequestError("sampling.top_p", f"must be in (0, 1]; got {top_p}")
    top_k = sampling.top_k if sampling.top_k is not None else 0
    if top_k < 0:
        raise InvalidRequestError("sampling.top_k", f"must be >= 0 (0: off); got {top_k}")
    _check_range("sampling.top_k", top_k, INT32)
    if sampling.seed is not None:
        _check_range("sampling.seed", sampling.seed, UINT64)
    return SamplingOptions(
        max_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k, seed=sampling.seed,
        min_p=_bounded(sampling, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_bounded(sampling, "repetition_penalty", 1.0, 0.0, 2.0, low_open=True),
        presence_penalty=_bounded(sampling, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_bounded(sampling, "frequency_penalty", 0.0, -2.0, 2.0),
    )  # fmt: skip


def _bounded(sampling: Sampling, name: str, default: float, low: float, high: float,
             low_open: bool = False) -> float:  # fmt: skip
    value: float | None = getattr(sampling, name)
    if value is None:
        return default
    above_low = value > low if low_open else value >= low
    if not (math.isfinite(value) and above_low and value <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidRequestError(f"sampling.{name}", f"must be in {interval}; got {value}")
    return value


def _with_stopping(
    options: SamplingOptions, stopping: Stopping, limits: LimitSettings
) -> SamplingOptions:
    """The stopping options but max_tokens (which needs the prompt's length)."""
    _check_range("stopping.min_tokens", stopping.min_tokens, UINT32)
    _check_range("stopping.time_limit_ms", stopping.time_limit_ms, UINT32)
    for index, token_id in enumerate(stopping.stop_token_ids):
        _check_range(f"stopping.stop_token_ids[{index}]", token_id, UINT32)
    return replace(
        options,
        stop=_stop_sequences(stopping, limits),
        stop_token_ids=stopping.stop_token_ids,
        include_stop_sequence=stopping.include_stop_sequence,
        min_tokens=stopping.min_tokens,
        ignore_eos=stopping.ignore_eos,
    )


def _with_token_options(
    options: SamplingOptions, response: TokenOptions, limits: LimitSettings
) -> SamplingOptions:
    """Which token details to ask the engine for."""
    top = response.top_n_tokens
    _check_range("response.top_n_tokens", top, UINT32)
    if top > limits.max_top_n_tokens:
        raise InvalidRequestError(
            "response.top_n_tokens", f"{top}; the limit is {limits.max_top_n_tokens}"
        )
    return replace(
        options,
        logprobs=top if response.generated_tokens else None,
        prompt_logprobs=top if response.input_tokens else None,
    )


def _n(request: GenerationRequest, limits: LimitSettings) -> int:
    n = request.n if request.n is not None else 1
    if not 1 <= n <= limits.max_n:
        raise InvalidRequestError("n", f"must be in [1, {limits.max_n}]; got {n}")
    return n


def _priority(priority: int, engine: Engine) -> int:
    _check_range("priority", priority, INT32)
    policy = engine.config.scheduling_policy
    if priority and policy != "priority":
        raise InvalidRequestError(
            "priority", f"the engine schedules {policy!r}; a priority other than 0 needs "
            f"model.scheduling_policy = \"priority\""
        )  # fmt: skip
    return priority


def _time_limit_s(stopping: Stopping, deadline_s: float | None) -> float | None:
    limits = [stopping.time_limit_ms / 1000] if stopping.time_limit_ms else []
    if deadline_s is not None:
        limits.append(max(0.0, deadline_s - DEADLINE_MARGIN_S))
    return min(limits, default=None)


def _stop_sequences(stopping: Stopping, limits: LimitSettings) -> tuple[str, ...]:
    if len(stopping.stop) > limits.max_stop_sequences:
        raise InvalidRequestError(
            "stopping.stop",
            f"{len(stopping.stop)} stop sequences; the limit is {limits.max_stop_sequences}",
        )
    for index, stop in enumerate(stopping.stop):
        if not stop:
            raise InvalidRequestError(f"stopping.stop[{index}]", "must not be empty")
        _check_size(f"stopping.stop[{index}]", len(stop.encode()), limits.max_stop_sequence_bytes)
    return stopping.stop


def _max_tokens(stopping: Stopping, prompt_tokens: int, context: int, limits: LimitSettings) -> int:
    room = context - prompt_tokens
    if room <= 0:
        raise InvalidRequestError(
            "prompt",
            f"{prompt_tokens} tokens; the context holds {context} tokens, prompt and answer",
        )
    if stopping.max_tokens is None:
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


def _check_range(field: str, value: int, bounds: tuple[int, int]) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise InvalidRequestError(field, f"must be in [{low}, {high}]; got {value}")
