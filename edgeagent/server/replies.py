"""The protobuf replies of the generation service, built from engine deltas and the slot."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from edgeagent.engine.interface import Delta, FinishReason, TokenDetail
from edgeagent.engine.slot import Serving
from edgeagent.settings import LimitSettings
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


@dataclass
class RequestClock:
    """When a request was admitted, got its first token and ended, and its prefix-cache hits."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    ended: float | None = None
    cached_prompt_tokens: int = 0

    def usage(self) -> pb.Usage:
        ended = self.ended if self.ended is not None else time.perf_counter()
        first = self.first_token if self.first_token is not None else ended
        return pb.Usage(
            cached_prompt_tokens=self.cached_prompt_tokens,
            time_to_first_token_ms=(first - self.started) * 1000,
            total_time_ms=(ended - self.started) * 1000,
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

    def message(self) -> pb.Completion:
        last = self.last or Delta("", 0, index=self.index)
        return pb.Completion(
            index=self.index,
            text="".join(self.texts),
            completion_tokens=last.completion_tokens,
            finish_reason=FINISH_REASONS[last.finish_reason],
            stop_sequence=last.stop_sequence or "",
            tokens=token_infos(self.tokens),
        )


def model_info(serving: Serving) -> pb.ModelInfo:
    facts = serving.engine.facts
    return pb.ModelInfo(
        model_id=serving.model_id,
        version=serving.version,
        max_context_tokens=facts.max_model_len,
        max_concurrent_requests=facts.max_num_seqs,
        architecture=facts.architecture,
        quantization=facts.quantization,
    )


def server_info(serving: Serving, limits: LimitSettings, in_flight: int) -> pb.ServerInfo:
    engine = serving.engine
    config, facts, load = engine.config, engine.facts, engine.load()
    return pb.ServerInfo(
        model=model_info(serving),
        serving_digest=serving.manifest.digest,
        engine=pb.EngineInfo(
            scheduling_policy=config.scheduling_policy,
            structured_output_backend=config.structured_output_backend,
            kv_cache_bytes=config.kv_cache_bytes,
            max_num_batched_tokens=config.max_num_batched_tokens or 0,
            dtype=config.dtype,
            enforce_eager=config.enforce_eager,
            vllm_version=facts.vllm_version,
            prefix_caching=facts.prefix_caching,
        ),
        load=pb.EngineLoad(
            running=load.running,
            waiting=load.waiting,
            kv_cache_usage=load.kv_cache_usage,
            in_flight=in_flight,
        ),
        limits=pb.RequestLimits(
            default_max_tokens=limits.default_max_tokens,
            max_input_bytes=limits.max_input_bytes,
            max_messages=limits.max_messages,
            max_stop_sequences=limits.max_stop_sequences,
            max_stop_sequence_bytes=limits.max_stop_sequence_bytes,
            max_prompt_tokens=limits.max_prompt_tokens or facts.max_model_len,
            max_waiting_requests=limits.max_waiting_requests,
            max_queued_prompt_tokens=limits.max_queued_prompt_tokens,
            max_constraint_bytes=limits.max_constraint_bytes,
            max_top_n_tokens=limits.max_top_n_tokens,
            max_n=limits.max_n,
        ),
    )
