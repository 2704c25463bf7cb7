"""The OpenAI-compatible HTTP API in a real daemon with fake engines, called with the official
`openai` client and plain httpx over the Unix socket: answers equal gRPC's, SSE framing, errors
in OpenAI's shape with the right status, disconnects abort the engine request, drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import openai
import pytest

from edgeagent.client import Parameters, build_request
from edgeagent.v1 import generation_pb2_grpc as pb_grpc
from fast.fakes import Behaviour
from fast.runner import PROMPT, Box, InProcess, in_process

MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]


def http(box: Box) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(box.root / "run" / "openai.sock"))
    return httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=30)


@contextlib.asynccontextmanager
async def client(box: Box) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client over the Unix socket (the host in the URL is not used)."""
    async with (
        http(box) as raw,
        openai.AsyncOpenAI(
            base_url="http://localhost/v1", api_key="x", http_client=raw, max_retries=0
        ) as api,
    ):
        yield api


@pytest.fixture
async def daemon(box: Box) -> AsyncIterator[InProcess]:
    async with in_process(box) as running:
        yield running


async def _grpc_chat_text(box: Box, max_tokens: int) -> str:
    request = build_request(messages=[("user", PROMPT)],
                            params=Parameters(max_tokens=max_tokens, temperature=0))  # fmt: skip
    async with grpc.aio.insecure_channel(box.target) as channel:
        reply = await pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=30)
    return str(reply.text)


async def test_chat_and_completions_answer_as_grpc_does(box: Box, daemon: InProcess) -> None:
    async with client(box) as api:
        await _answers_as_grpc_does(box, api)


async def _answers_as_grpc_does(box: Box, api: openai.AsyncOpenAI) -> None:
    models = await api.models.list()
    model = models.data[0].id
    version = box.versions["a"].version
    chat = await api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6,
                                             temperature=0)  # fmt: skip
    assert chat.choices[0].message.content == await _grpc_chat_text(box, 6)
    assert chat.choices[0].finish_reason == "length"
    assert chat.system_fingerprint == version
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 6
    text = await api.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert text.choices[0].text
    assert text.usage is not None
    assert text.usage.prompt_tokens == len(PROMPT.encode())  # the fake's tokens are bytes
    stream = await api.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        chat.choices[0].message.content)  # fmt: skip
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


async def test_sse_framing_ends_with_done(box: Box, daemon: InProcess) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True}
    async with http(box) as raw, raw.stream("POST", "/v1/completions", json={
            "prompt": PROMPT, "max_tokens": 3, "stream": True}) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line async for line in response.aiter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[6:])["object"] for e in events[:-1]] == ["text_completion"] * 3
    async with http(box) as raw:
        reply = await raw.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"tools": []}, 400, "tools", "not supported"),
        ({"frobnicate": 1}, 400, "frobnicate", "unknown field"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "robot"),
        ({"max_tokens": 10**7}, 400, "max_tokens", "exceeds the context"),
        ({"model": "other"}, 404, None, "not served"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, 400,
         "response_format", "not several"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages[0].content", ""),
    ],
)  # fmt: skip
async def test_errors_in_openai_shape(
    box: Box, daemon: InProcess, body: dict[str, Any], status: int, param: str | None, words: str
) -> None:
    async with http(box) as raw:
        reply = await raw.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
    error = reply.json()["error"]
    assert reply.status_code == status, error
    assert error["param"] == param or (param and error["param"].startswith(param))
    assert words in error["message"]


async def test_client_errors_and_oversized_prompts(box: Box) -> None:
    async with in_process(box, EDGEAGENT_LIMITS__MAX_PROMPT_TOKENS="5") as _:
        async with client(box) as api:
            with pytest.raises(openai.BadRequestError) as refused:
                await api.chat.completions.create(model="", messages=MESSAGES, tools=[])
        assert "tools" in str(refused.value)
        async with http(box) as raw:
            too_big = await raw.post("/v1/completions", json={"prompt": PROMPT})
            nowhere = await raw.get("/v1/nothing")
            not_json = await raw.post("/v1/completions", content=b"{")
    assert too_big.status_code == 413, too_big.text
    assert too_big.json()["error"]["type"] == "invalid_request_error"  # not retried as a 429
    assert nowhere.status_code == 404
    assert "error" in nowhere.json()
    assert not_json.status_code == 400


async def test_busy_is_a_429_rate_limit_error_and_too_large_a_413_invalid_request(
    box: Box,
) -> None:
    """As OpenAI's client sees them: a refusal for load (queued prompt tokens past the bound
    while another request streams) is a `rate_limit_error` with Retry-After, which it retries;
    a prompt that can never fit is an `invalid_request_error`, which it does not."""
    box.add("slow", Behaviour(seed=3, token_s=0.01), current=True)
    limits = {"EDGEAGENT_LIMITS__MAX_QUEUED_PROMPT_TOKENS": "100",
              "EDGEAGENT_LIMITS__MAX_PROMPT_TOKENS": "80"}  # fmt: skip
    body = {"prompt": "x" * 60, "max_tokens": 500, "stream": True}
    async with in_process(box, **limits), http(box) as raw, client(box) as api:
        # Before the stream: sent after it (on the client that got the 429), this request was
        # seen to wait until the closed stream's generation would have ended, though the
        # server frees a closed stream at once; that made the check flaky (not yet understood)
        with pytest.raises(openai.APIStatusError) as too_large:
            await api.completions.create(model="", prompt="z" * 90)
        async with raw.stream("POST", "/v1/completions", json=body) as streaming:
            await anext(streaming.aiter_lines())  # its 60 prompt tokens are queued now
            with pytest.raises(openai.RateLimitError) as busy:
                await api.completions.create(model="", prompt="y" * 60)
    assert busy.value.type == "rate_limit_error"
    assert int(busy.value.response.headers["Retry-After"]) >= 1
    assert too_large.value.status_code == 413
    assert too_large.value.type == "invalid_request_error"


async def test_a_body_past_the_limit_is_refused_with_or_without_a_length(box: Box) -> None:
    """server.max_message_bytes bounds HTTP bodies as it bounds gRPC messages: one that says
    its length is refused unread, one sent in chunks once it passes the limit."""
    limit = 64 * 1024
    big = json.dumps({"prompt": "x" * (2 * limit), "max_tokens": 1}).encode()
    small = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()

    async def chunked(body: bytes) -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    json_type = {"Content-Type": "application/json"}
    async with in_process(box, EDGEAGENT_SERVER__MAX_MESSAGE_BYTES=str(limit)), http(box) as raw:
        said = await raw.post("/v1/completions", content=big, headers=json_type)
        streamed = await raw.post("/v1/completions", content=chunked(big), headers=json_type)
        fine = await raw.post("/v1/completions", content=chunked(small), headers=json_type)
    assert said.status_code == streamed.status_code == 413, (said.text, streamed.text)
    for refused in (said, streamed):
        assert refused.json()["error"]["type"] == "invalid_request_error"
    assert "the limit is 65536 bytes" in streamed.json()["error"]["message"]
    assert fine.status_code == 200, fine.text
    assert fine.json()["usage"]["completion_tokens"] == 2


async def test_a_dropped_stream_is_aborted_in_the_engine(box: Box) -> None:
    box.add("slow", Behaviour(seed=3, token_s=0.01), current=True)
    async with in_process(box) as daemon:
        body = {"messages": MESSAGES, "max_tokens": 500, "stream": True}
        async with http(box) as raw, raw.stream("POST", "/v1/chat/completions",
                                                json=body) as response:  # fmt: skip
            async for line in response.aiter_lines():
                if line:
                    break
            assert daemon.engine.num_unfinished_requests() == 1
        for _ in range(200):
            if daemon.engine.num_unfinished_requests() == 0 and not len(daemon.daemon.slot):
                break
            await asyncio.sleep(0.01)
        assert daemon.engine.num_unfinished_requests() == 0
        assert len(daemon.daemon.slot) == 0


async def test_a_dropped_unary_request_is_aborted_in_the_engine(box: Box) -> None:
    box.add("slow", Behaviour(seed=3, token_s=0.01), current=True)
    async with in_process(box) as daemon:
        body = {"prompt": PROMPT, "max_tokens": 500}
        async with http(box) as raw:
            request = asyncio.create_task(raw.post("/v1/completions", json=body))
            for _ in range(500):
                if daemon.engine.num_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            assert daemon.engine.num_unfinished_requests() == 1
            request.cancel()  # closes the connection
            with contextlib.suppress(asyncio.CancelledError):
                await request
        for _ in range(200):
            if daemon.engine.num_unfinished_requests() == 0 and not len(daemon.daemon.slot):
                break
            await asyncio.sleep(0.01)
        assert daemon.engine.num_unfinished_requests() == 0
        assert len(daemon.daemon.slot) == 0


async def test_health_ready_and_drain(box: Box) -> None:
    box.add("slow", Behaviour(seed=3, token_s=0.01), current=True)
    async with in_process(box) as daemon, http(box) as raw:
        assert (await raw.get("/health")).status_code == 200
        assert (await raw.get("/ready")).status_code == 200
        body = {"prompt": PROMPT, "max_tokens": 100, "stream": True}
        async with raw.stream("POST", "/v1/completions", json=body) as response:
            lines = response.aiter_lines()
            await anext(lines)
            daemon.daemon.should_exit = True
            await _until_draining(daemon)
            ready = await raw.get("/ready")
            refused = await raw.post("/v1/completions", json={"prompt": PROMPT})
            rest = [line async for line in lines if line]
        assert await daemon.exit_code() == 0
    assert ready.status_code == 503
    assert refused.status_code == 503
    assert "shutting down" in refused.json()["error"]["message"]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"


async def test_a_stream_cut_by_the_drain_ends_with_an_error_event(box: Box) -> None:
    box.add("slow", Behaviour(seed=3, token_s=0.01), current=True)
    async with in_process(box, EDGEAGENT_SERVER__DRAIN_GRACE_S="0.2") as daemon, http(box) as raw:
        body = {"prompt": PROMPT, "max_tokens": 500, "stream": True}
        async with raw.stream("POST", "/v1/completions", json=body) as response:
            lines = response.aiter_lines()
            await anext(lines)
            daemon.daemon.should_exit = True
            rest = [line async for line in lines if line]
        assert await daemon.exit_code() == 0
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["type"] == "service_unavailable_error"
    assert "0.2 s drain grace period" in error["message"]


async def _until_draining(daemon: InProcess) -> None:
    for _ in range(500):
        if daemon.daemon.slot.state == "draining":
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the daemon never began to drain")


async def test_tcp_needs_the_bearer_token(box: Box) -> None:
    settings = {"EDGEAGENT_SERVER__HTTP_TCP_ADDRESS": "127.0.0.1:0", "EDGEAGENT_API_TOKEN": "s3"}
    async with in_process(box, **settings) as daemon:
        assert daemon.daemon.http is not None
        base = f"http://127.0.0.1:{daemon.daemon.http.tcp_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as tcp:
            anonymous = await tcp.get("/v1/models")
            wrong = await tcp.get("/v1/models", headers={"Authorization": "Bearer nope"})
            health = await tcp.get("/health")
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="s3", max_retries=0) as api:
            models = await api.models.list()
    assert anonymous.status_code == 401
    assert wrong.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"
    assert health.status_code == 200
    assert models.data[0].id


async def _http_streams_until(box: Box, stop: asyncio.Event, failures: list[str]) -> int:
    completed, body = 0, {"messages": MESSAGES, "max_tokens": 6, "stream": True}
    async with http(box) as raw:
        while not stop.is_set():
            async with raw.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = [line async for line in response.aiter_lines() if line]
            if response.status_code != 200 or lines[-1] != "data: [DONE]" or "error" in lines[-2]:
                failures.append(f"{response.status_code}: {lines[-2:]}")
            completed += 1
    return completed


async def _grpc_streams_until(box: Box, stop: asyncio.Event, failures: list[str]) -> int:
    completed, request = 0, build_request(PROMPT, params=Parameters(max_tokens=6))
    async with grpc.aio.insecure_channel(box.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        while not stop.is_set():
            try:
                _ = [message async for message in stub.GenerateStream(request)]
            except grpc.aio.AioRpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")
            completed += 1
    return completed


async def test_http_and_grpc_streams_through_hot_swaps_fail_nothing(box: Box) -> None:
    """Three HTTP and three gRPC clients stream while A → B → A → B swap (0.3 s reloads)."""
    box.add("c", Behaviour(seed=1, token_s=0.005, reload_s=0.3), current=True)
    box.add("d", Behaviour(seed=2, token_s=0.005, reload_s=0.3))
    d = box.versions["d"].version
    async with in_process(box) as daemon:
        stop, failures = asyncio.Event(), list[str]()
        runs = (_http_streams_until, _grpc_streams_until) * 3
        clients = [asyncio.create_task(run(box, stop, failures)) for run in runs]
        await asyncio.sleep(0.3)
        results = [(await daemon.update(d)).result, (await daemon.rollback()).result]
        results.append((await daemon.update(d)).result)
        await asyncio.sleep(0.3)
        stop.set()
        counts = await asyncio.gather(*clients)
    assert results == [1, 1, 1]
    assert failures == []
    assert min(counts) > 0
