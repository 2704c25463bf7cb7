"""The gRPC API against the real engine: generation, streaming, chat, cancellation, bad input."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from conftest import (
    TEST_CONTEXT,
    TEST_LIMITS,
    TEST_MAX_MESSAGE_BYTES,
    wait_until_engine_idle,
)
from fuzz_requests import ALLOWED, requests
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from hypothesis import HealthCheck, given, settings

from edgeagent.client import Parameters, build_request
from edgeagent.engine.slot import ServingSlot
from edgeagent.engine.vllm_engine import VllmEngine
from edgeagent.store.manifest import Manifest
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

Stub = pb_grpc.GenerationServiceStub
LONG = Parameters(max_tokens=TEST_CONTEXT - 64, temperature=0)


async def test_generate_returns_text_counts_and_reason(stub: Stub, tiny_4bit: Manifest) -> None:
    request = build_request("The river runs", params=Parameters(max_tokens=16, temperature=0))
    response = await stub.Generate(request)
    assert response.text
    assert response.prompt_tokens > 0
    assert 0 < response.completion_tokens <= 16
    assert response.finish_reason in (pb.FINISH_REASON_MAX_TOKENS, pb.FINISH_REASON_EOS_TOKEN)
    assert response.model_version == tiny_4bit.version
    assert not response.HasField("seed")


async def test_stream_matches_unary(stub: Stub) -> None:
    request = build_request("The river runs", params=Parameters(max_tokens=24, seed=7))
    unary = await stub.Generate(request)
    messages = [m async for m in stub.GenerateStream(request)]
    assert len(messages) > 1
    assert "".join(m.text for m in messages) == unary.text
    assert all(m.finish_reason == pb.FINISH_REASON_NOT_FINISHED for m in messages[:-1])
    last = messages[-1]
    assert last.finish_reason == unary.finish_reason
    assert last.completion_tokens == unary.completion_tokens
    assert last.seed == unary.seed == 7


async def test_chat_uses_the_models_template(stub: Stub, engine: VllmEngine) -> None:
    messages = [("system", "Be brief."), ("user", "Why is the sky blue?")]
    request = build_request(messages=messages, params=Parameters(max_tokens=4, temperature=0))
    response = await stub.Generate(request)
    expected = (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|>"
        "<|im_start|>user<|im_sep|>Why is the sky blue?<|im_end|><|im_start|>assistant<|im_sep|>"
    )
    assert response.prompt_tokens == len(engine.encode(expected))
    raw = await stub.Generate(
        build_request(expected, params=Parameters(max_tokens=4, temperature=0))
    )
    assert raw.text == response.text


async def test_stop_sequence_is_reported(stub: Stub) -> None:
    free = await stub.Generate(
        build_request("Numbers:", params=Parameters(max_tokens=32, temperature=0))
    )
    stop = free.text.strip()[2:6]
    params = Parameters(max_tokens=32, temperature=0, stop=[stop])
    response = await stub.Generate(build_request("Numbers:", params=params))
    assert response.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert response.stop_sequence == stop


async def test_default_max_tokens_shrinks_to_the_context(stub: Stub, engine: VllmEngine) -> None:
    response = await stub.Generate(build_request("Hello", params=Parameters(temperature=0)))
    assert response.completion_tokens <= TEST_LIMITS.default_max_tokens
    prompt = "word " * (TEST_CONTEXT - 10)
    prompt_tokens = len(engine.encode(prompt))
    room = TEST_CONTEXT - prompt_tokens
    assert 0 < room < TEST_LIMITS.default_max_tokens
    filled = await stub.Generate(build_request(prompt, params=Parameters(temperature=0)))
    assert filled.prompt_tokens == prompt_tokens
    if filled.finish_reason != pb.FINISH_REASON_EOS_TOKEN:
        assert filled.finish_reason == pb.FINISH_REASON_TOKEN_LIMIT
        assert filled.completion_tokens == room


async def test_client_cancel_aborts_in_engine(
    stub: Stub, engine: VllmEngine, slot: ServingSlot
) -> None:
    call = stub.GenerateStream(build_request("Hello", params=LONG))
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            assert engine.num_unfinished_requests() == 1
            call.cancel()
            break
    await wait_until_engine_idle(engine, slot)


async def test_deadline_aborts_in_engine(stub: Stub, engine: VllmEngine, slot: ServingSlot) -> None:
    """The daemon ends a stream just before its deadline, so the client gets its end."""
    messages = [
        m async for m in stub.GenerateStream(build_request("Hello", params=LONG), timeout=0.5)
    ]
    assert messages[-1].finish_reason == pb.FINISH_REASON_TIME_LIMIT
    assert 0 < messages[-1].completion_tokens < LONG.max_tokens
    await wait_until_engine_idle(engine, slot)


BAD_REQUESTS = [
    pytest.param(pb.GenerateRequest(), "input", "either a prompt or chat", id="no-input"),
    pytest.param(build_request(""), "prompt", "must not be empty", id="empty-prompt"),
    pytest.param(build_request(messages=[]), "chat.messages", "at least one", id="no-messages"),
    pytest.param(
        build_request(messages=[("robot", "hi")]),
        "chat.messages[0].role",
        "unknown role 'robot'",
        id="unknown-role",
    ),
    pytest.param(
        build_request(messages=[("user", "hi")] * 9),
        "chat.messages",
        "limit is 8",
        id="too-many-messages",
    ),
    pytest.param(
        build_request("hi", params=Parameters(max_tokens=0)),
        "stopping.max_tokens",
        "must be > 0",
        id="zero-max-tokens",
    ),
    pytest.param(
        build_request("hi", params=Parameters(max_tokens=-5)),
        "stopping.max_tokens",
        "must be > 0; got -5",
        id="negative-max-tokens",
    ),
    pytest.param(
        build_request("hi", params=Parameters(max_tokens=TEST_CONTEXT)),
        "stopping.max_tokens",
        f"context of {TEST_CONTEXT} tokens",
        id="beyond-context",
    ),
    pytest.param(
        build_request("hi", params=Parameters(temperature=-0.1)),
        "sampling.temperature",
        "must be >= 0",
        id="negative-temperature",
    ),
    pytest.param(
        build_request("hi", params=Parameters(top_p=0.0)),
        "sampling.top_p",
        "(0, 1]",
        id="zero-top-p",
    ),
    pytest.param(
        build_request("hi", params=Parameters(top_p=1.5)),
        "sampling.top_p",
        "(0, 1]",
        id="top-p-above-one",
    ),
    pytest.param(
        build_request("hi", params=Parameters(top_k=-1)),
        "sampling.top_k",
        ">= 0",
        id="negative-top-k",
    ),
    pytest.param(
        build_request("hi", params=Parameters(stop=["a", "b", "c"])),
        "stopping.stop",
        "limit is 2",
        id="too-many-stops",
    ),
    pytest.param(
        build_request("hi", params=Parameters(stop=[""])),
        "stopping.stop[0]",
        "must not be empty",
        id="empty-stop",
    ),
    pytest.param(
        build_request("word " * 1500),
        "prompt",
        f"the context holds {TEST_CONTEXT} tokens",
        id="prompt-beyond-context",
    ),
    pytest.param(
        build_request("x" * (TEST_LIMITS.max_input_bytes + 1)),
        "prompt",
        f"the limit is {TEST_LIMITS.max_input_bytes} bytes",
        id="oversized-prompt",
    ),
    pytest.param(
        build_request(messages=[("user", "y" * 9000), ("user", "z" * 9000)]),
        "chat.messages",
        "the limit is",
        id="oversized-chat",
    ),
]


@pytest.mark.parametrize(("request_", "field", "detail"), BAD_REQUESTS)
async def test_bad_input_is_invalid_argument(
    stub: Stub, request_: pb.GenerateRequest, field: str, detail: str
) -> None:
    for call in (stub.Generate, _first_stream_message(stub)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        message = caught.value.details() or ""
        assert message.startswith(f"{field}: "), message
        assert detail in message, message
    await _assert_still_serving(stub)


async def test_message_over_transport_limit_is_refused(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(build_request("x" * (TEST_MAX_MESSAGE_BYTES + 1)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await _assert_still_serving(stub)


async def test_model_info(stub: Stub, tiny_4bit: Manifest) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.architecture == "Phi3ForCausalLM"
    assert info.max_context_tokens == TEST_CONTEXT
    assert (info.model_id, info.version) == (tiny_4bit.model_id, tiny_4bit.version)


async def test_health_and_reflection(api_target: str) -> None:
    async with grpc.aio.insecure_channel(api_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "edgeagent.v1.GenerationService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    services, methods, constraint_kinds = await asyncio.to_thread(_reflected, api_target)
    assert "edgeagent.v1.GenerationService" in services
    assert "grpc.health.v1.Health" in services
    assert {"Generate", "GenerateStream", "GetModelInfo", "GetServerInfo", "Tokenize",
            "Detokenize"} <= set(methods)  # fmt: skip
    assert constraint_kinds == ["json_schema", "json_object", "regex", "choice", "grammar"]


async def _assert_still_serving(stub: Stub) -> None:
    """After a refused request, a good one is still answered in full."""
    response = await stub.Generate(build_request("ok", params=Parameters(max_tokens=2)))
    assert response.completion_tokens > 0
    assert response.finish_reason != pb.FINISH_REASON_UNSPECIFIED


def _reflected(target: str) -> tuple[list[str], list[str], list[str]]:
    """What a reflection client (as grpcurl uses) sees: the services, the generation service's
    methods and the constraint kinds; blocking, so run off the event loop."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("edgeagent.v1.GenerationService")
        constraint = pool.FindMessageTypeByName("edgeagent.v1.Constraint")
        return (
            list(database.get_services()),
            [method.name for method in service.methods],
            [field.name for field in constraint.oneofs_by_name["kind"].fields],
        )


def _first_stream_message(stub: Stub):  # type: ignore[no-untyped-def]
    async def call(request: pb.GenerateRequest, **kwargs: Any) -> pb.GenerateStreamResponse:
        async for message in stub.GenerateStream(request, **kwargs):
            return message
        raise AssertionError("stream ended without a message")

    return call


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(request=requests())
async def test_fuzzed_requests_get_a_code_a_client_can_act_on(
    stub: Stub, request: pb.GenerateRequest
) -> None:
    """A sample of the fast tier's fuzzing on the real engine: vLLM's own checks must surface as
    INVALID_ARGUMENT, never INTERNAL."""
    codes = set()
    for call in (stub.Generate, _first_stream_message(stub)):
        try:
            await call(request, timeout=30)
            codes.add(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            codes.add(error.code())
    assert codes <= ALLOWED, codes
    await _assert_still_serving(stub)
