"""Hypothesis strategies for every field of the generation API's requests, shared by the fast
tier's fuzzing (fake engine, many examples) and the real engine's sample."""

from __future__ import annotations

import grpc
from hypothesis import strategies as st

from edgeagent.v1 import generation_pb2 as pb

# What a hostile or buggy client may get back; never UNKNOWN or INTERNAL.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNAVAILABLE,
}

texts = st.text(max_size=200)
roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), texts)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
int32 = st.integers(-(2**31), 2**31 - 1)
uint64 = st.integers(0, 2**64 - 1)
binary_metadata = st.lists(
    st.tuples(st.sampled_from(["x-fuzz-bin", "x-trace-bin"]), st.binary(max_size=64)),
    max_size=3,
)


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    request = pb.GenerateRequest()
    kind = draw(st.sampled_from(["prompt", "chat", "none"]))
    if kind == "prompt":
        request.prompt = draw(texts)
    elif kind == "chat":
        for role, content in draw(st.lists(st.tuples(roles, texts), max_size=12)):
            request.chat.messages.add(role=role, content=content)
    for name, strategy in (("temperature", floats), ("top_p", floats), ("top_k", int32),
                           ("seed", uint64)):  # fmt: skip
        if draw(st.booleans()):
            setattr(request.sampling, name, draw(strategy))
    if draw(st.booleans()):
        request.stopping.max_tokens = draw(st.one_of(int32, st.integers(1, 64)))
    request.stopping.stop.extend(draw(st.lists(texts, max_size=12)))
    if draw(st.booleans()):
        _grown_fields(draw, request)
    return request


uint32 = st.integers(0, 2**32 - 1)
schemas = st.one_of(
    texts,
    st.sampled_from(['{}', '{"type": "object"}', '{"type": "strnig"}', '{"enum": [1, "a"]}',
                     '{"$ref": "#/nowhere"}', '{"type": "array", "items": {"$ref": "#"}}']),
)  # fmt: skip


def _grown_fields(draw: st.DrawFn, request: pb.GenerateRequest) -> None:
    """The fields the API gained with structured output, token details and limits."""
    for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if draw(st.booleans()):
            setattr(request.sampling, name, draw(floats))
    stopping = request.stopping
    stopping.min_tokens = draw(st.one_of(st.integers(0, 8), uint32))
    stopping.time_limit_ms = draw(st.one_of(st.integers(0, 2000), uint32))
    stopping.include_stop_sequence = draw(st.booleans())
    stopping.ignore_eos = draw(st.booleans())
    stopping.stop_token_ids.extend(draw(st.lists(uint32, max_size=4)))
    request.response.generated_tokens = draw(st.booleans())
    request.response.input_tokens = draw(st.booleans())
    request.response.top_n_tokens = draw(st.one_of(st.integers(0, 8), uint32))
    if draw(st.booleans()):
        request.n = draw(st.one_of(st.integers(0, 4), uint32))
    request.priority = draw(st.one_of(st.just(0), int32))
    if draw(st.booleans()):
        request.max_queue_ms = draw(st.one_of(st.integers(0, 2000), uint32))
    kind = draw(st.sampled_from(["none", "json_schema", "json_object", "regex", "choice",
                                 "grammar"]))  # fmt: skip
    constraint = request.constraint
    if kind == "json_schema":
        constraint.json_schema = draw(schemas)
    elif kind == "json_object":
        constraint.json_object = draw(st.booleans())
    elif kind in ("regex", "grammar"):
        setattr(constraint, kind, draw(texts))
    elif kind == "choice":
        constraint.choice.choices.extend(draw(st.lists(texts, max_size=5)))


def huge(kind: str) -> pb.GenerateRequest:
    """The large cases: 10k stop strings, a 4 MiB prompt, 5k chat messages, odd roles."""
    request = pb.GenerateRequest()
    if kind == "stops":
        request.prompt = "hello"
        request.stopping.stop.extend(f"stop{i}" for i in range(10_000))
    elif kind == "prompt":
        request.prompt = "x" * (4 << 20)
    elif kind == "messages":
        for index in range(5_000):
            request.chat.messages.add(role="user", content=f"message {index}")
    elif kind == "roles":
        for role in ("tool", "USER", "", "system\x00", "<|im_start|>"):
            request.chat.messages.add(role=role, content="hi")
    elif kind == "empty":
        request.chat.messages.add(role="user", content="")
    return request
