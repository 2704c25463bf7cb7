"""The gRPC side of the serving core: protobuf requests → the core's request types
(`server/core.py`), the core's results → protobuf replies. Nothing is checked here: the
checks are `server/requests.py`'s, shared with the OpenAI API."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from edgeagent.engine.interface import Delta, FinishReason, TokenDetail
from edgeagent.server.core import (
    ChatMessage,
    CompletionParts,
    GenerationRequest,
    PromptInput,
    RequestedConstraint,
    Sampling,
    Stopping,
    TokenOptions,
    Usage,
)
from edgeagent.v1 import generation_pb2 as pb

FINISH_REASONS = {
    None: pb.FINISH_REASON_NOT_FINISHED,
    FinishReason.MAX_TOKENS: pb.FINISH_REASON_MAX_TOKENS,
    FinishReason.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.TOKEN_LIMIT: pb.FINISH_REASON_TOKEN_LIMIT,
    FinishReason.TIME_LIMIT: pb.FINISH_REASON_TIME_LIMIT,
}


def generation_request(request: pb.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        input=prompt_input(request),
        sampling=_sampling(request.sampling),
        stopping=_stopping(request.stopping),
        token_options=TokenOptions(
            generated_tokens=request.response.generated_tokens,
            input_tokens=request.response.input_tokens,
            top_n_tokens=request.response.top_n_tokens,
        ),
        constraint=_constraint(request.constraint),
        n=request.n if request.HasField("n") else None,
        priority=request.priority,
        max_queue_ms=request.max_queue_ms,
    )


def prompt_input(request: pb.GenerateRequest | pb.TokenizeRequest) -> PromptInput:
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return PromptInput(prompt=request.prompt)
    if kind == "chat":
        chat = tuple(ChatMessage(m.role, m.content) for m in request.chat.messages)
        return PromptInput(chat=chat)
    return PromptInput()


def _given(message: pb.SamplingParameters | pb.StoppingCriteria, name: str) -> Any:
    """An optional field's value, or None when it is unset."""
    return getattr(message, name) if message.HasField(name) else None


def _sampling(sampling: pb.SamplingParameters) -> Sampling:
    return Sampling(
        temperature=_given(sampling, "temperature"),
        top_p=_given(sampling, "top_p"),
        top_k=_given(sampling, "top_k"),
        seed=_given(sampling, "seed"),
        repetition_penalty=_given(sampling, "repetition_penalty"),
        min_p=_given(sampling, "min_p"),
        presence_penalty=_given(sampling, "presence_penalty"),
        frequency_penalty=_given(sampling, "frequency_penalty"),
    )


def _stopping(stopping: pb.StoppingCriteria) -> Stopping:
    return Stopping(
        max_tokens=_given(stopping, "max_tokens"),
        stop=tuple(stopping.stop),
        min_tokens=stopping.min_tokens,
        time_limit_ms=stopping.time_limit_ms,
        include_stop_sequence=stopping.include_stop_sequence,
        stop_token_ids=tuple(stopping.stop_token_ids),
        ignore_eos=stopping.ignore_eos,
    )


def _constraint(constraint: pb.Constraint) -> RequestedConstraint | None:
    kind = constraint.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "choice":
        return RequestedConstraint(choice=tuple(constraint.choice.choices))
    return RequestedConstraint(**{kind: getattr(constraint, kind)})


def usage_message(usage: Usage) -> pb.Usage:
    return pb.Usage(
        cached_prompt_tokens=usage.cached_prompt_tokens,
        time_to_first_token_ms=usage.time_to_first_token_ms,
        total_time_ms=usage.total_time_ms,
    )


def token_infos(details: Iterable[TokenDetail]) -> list[pb.TokenInfo]:
    return [_token_info(detail) for detail in details]


def _token_info(detail: TokenDetail) -> pb.TokenInfo:
    info = pb.TokenInfo(id=detail.id, text=detail.text)
    if detail.logprob is not None:
        info.logprob = detail.logprob
    if detail.rank is not None:
        info.rank = detail.rank
    info.top_tokens.extend(
        pb.TopToken(id=top.id, text=top.text, logprob=top.logprob) for top in detail.top
    )
    return info


def completion_message(parts: CompletionParts) -> pb.Completion:
    last = parts.final
    return pb.Completion(
        index=parts.index,
        text=parts.text,
        completion_tokens=last.completion_tokens,
        finish_reason=FINISH_REASONS[last.finish_reason],
        stop_sequence=last.stop_sequence or "",
        tokens=token_infos(parts.tokens),
    )


def stream_message(delta: Delta, prompt_tokens: int, version: str) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        text=delta.text, prompt_tokens=prompt_tokens, completion_tokens=delta.completion_tokens,
        finish_reason=FINISH_REASONS[delta.finish_reason],
        stop_sequence=delta.stop_sequence or "", model_version=version, index=delta.index,
        tokens=token_infos(delta.tokens), input_tokens=token_infos(delta.prompt_tokens),
    )  # fmt: skip
