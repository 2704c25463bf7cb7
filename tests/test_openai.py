"""The OpenAI-compatible HTTP API on the real CPU engine, called as apps call it: the official
`openai` client over the Unix socket (unary, streaming with usage, completions, JSON schema,
an unsupported field) and `curl --unix-socket` for server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from conftest import TEST_LIMITS, wait_until_engine_idle

from edgeagent.engine.slot import ServingSlot
from edgeagent.metrics import Metrics
from edgeagent.server.generation import GenerationCore
from edgeagent.server.openai.listen import HttpApi
from edgeagent.settings import ServerSettings

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}  # fmt: skip
HELLO: Any = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
async def sock(slot: ServingSlot, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    path = tmp_path_factory.mktemp("http") / "openai.sock"
    api = HttpApi(GenerationCore(slot, TEST_LIMITS, Metrics()), ServerSettings(), path)
    await api.start()
    yield path
    await api.stop()


@pytest.fixture
async def client(sock: Path) -> AsyncIterator[openai.AsyncOpenAI]:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with (
        httpx.AsyncClient(transport=transport) as raw,
        openai.AsyncOpenAI(
            base_url="http://localhost/v1", api_key="x", http_client=raw, max_retries=0
        ) as api,
    ):
        yield api


async def test_the_sync_client_three_liner(sock: Path) -> None:
    """The README's example, as written (in a thread: the server runs in this loop)."""

    def call() -> str | None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as http:
            api = openai.OpenAI(base_url="http://localhost/v1", api_key="x", http_client=http)
            reply = api.chat.completions.create(model="", messages=HELLO, max_tokens=8)
            return reply.choices[0].message.content

    assert await asyncio.to_thread(call)


async def test_chat_unary_and_streaming_with_usage(client: openai.AsyncOpenAI) -> None:
    model = (await client.models.list()).data[0].id
    unary = await client.chat.completions.create(model=model, messages=HELLO, max_tokens=8,
                                                 temperature=0, seed=1)  # fmt: skip
    stream = await client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=8, temperature=0, seed=1, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert unary.choices[0].message.content == streamed
    assert unary.usage is not None
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens


async def test_completions_with_logprobs(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(model="", prompt="The river runs", max_tokens=5,
                                            logprobs=2, temperature=0)  # fmt: skip
    choice = reply.choices[0]
    assert choice.text
    assert choice.logprobs is not None
    assert len(choice.logprobs.tokens or []) == 5
    assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs or [])


async def test_json_schema_output_validates(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=60, response_format={"type": "json_schema",
                                        "json_schema": {"name": "person", "schema": PERSON}},
    )  # fmt: skip
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), PERSON)


async def test_an_unsupported_field_is_refused_by_name(client: openai.AsyncOpenAI) -> None:
    tool: Any = {"type": "function", "function": {"name": "f", "parameters": {}}}
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="", messages=HELLO, tools=[tool])
    assert refused.value.status_code == 400
    assert "tools: not supported" in str(refused.value)


async def test_curl_streams_server_sent_events(sock: Path, slot: ServingSlot) -> None:
    body = json.dumps({"messages": HELLO, "max_tokens": 6, "stream": True})
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "--unix-socket", str(sock), "-H", "Content-Type: application/json",
        "-d", body, "http://localhost/v1/chat/completions", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await curl.communicate()
    events = [line for line in out.decode().splitlines() if line]
    assert curl.returncode == 0
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    serving = slot.current()
    await wait_until_engine_idle(serving.engine, slot)
