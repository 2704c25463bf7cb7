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
    return request


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
