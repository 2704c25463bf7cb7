"""The protobuf replies of GetModelInfo and GetServerInfo, read from the slot (a generation's
replies are `server/grpc_mapping.py`'s)."""

from __future__ import annotations

from edgeagent.engine.slot import Serving
from edgeagent.settings import LimitSettings
from edgeagent.v1 import generation_pb2 as pb


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
            quantized_kernel=facts.quantized_kernel,
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
