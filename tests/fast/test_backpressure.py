"""Bounds on what may wait: beyond them RESOURCE_EXHAUSTED with a retry hint, counted; a
client that vanishes or stops reading frees its engine slots."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from waits import HANG_S

from edgeagent.client import Parameters, build_request
from edgeagent.v1 import generation_pb2_grpc as pb_grpc
from fast.fakes import Behaviour
from fast.runner import TESTS, Box, InProcess, in_process

SMALL_BATCH = {"EDGEAGENT_MODEL__MAX_NUM_SEQS": "2", "EDGEAGENT_LIMITS__MAX_WAITING_REQUESTS": "3"}


async def _outcome(daemon: InProcess, prompt: str, max_tokens: int) -> tuple[str, str | None]:
    """How one unary call ended: its status code name and the retry hint, if any."""
    request = build_request(prompt, params=Parameters(max_tokens=max_tokens, temperature=0))
    async with grpc.aio.insecure_channel(daemon.box.target) as channel:
        call = pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=30)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            trailing = dict(error.trailing_metadata() or ())
            return error.code().name, trailing.get("retry-after-ms")
        return "OK", None


async def test_beyond_the_waiting_bound_requests_are_refused_with_a_retry_hint(
    box: Box,
) -> None:
    """A batch of 2 and room for 3 waiting: of 9 requests at once, 5 are answered and 4 are
    refused at once with RESOURCE_EXHAUSTED and a retry hint; the refusals are counted."""
    box.add("a", Behaviour(seed=1, token_s=0.02), current=True)
    async with in_process(box, **SMALL_BATCH) as daemon:
        outcomes = await asyncio.gather(*(_outcome(daemon, f"q{i}", 20) for i in range(9)))
        refused = daemon.daemon.api  # for the metrics below
        assert refused is not None
        after = await _outcome(daemon, "later", 2)
    codes = sorted(code for code, _ in outcomes)
    assert codes == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"] * 4
    hints = [int(hint) for code, hint in outcomes if code == "RESOURCE_EXHAUSTED" and hint]
    assert len(hints) == 4
    assert all(100 <= hint <= 30_000 for hint in hints)
    assert after == ("OK", None)


async def test_queued_prompt_tokens_and_prompt_length_are_bounded(box: Box) -> None:
    box.add("a", Behaviour(seed=1, token_s=0.02), current=True)
    limits = {"EDGEAGENT_LIMITS__MAX_QUEUED_PROMPT_TOKENS": "100",
              "EDGEAGENT_LIMITS__MAX_PROMPT_TOKENS": "80"}  # fmt: skip
    async with in_process(box, **limits) as daemon:
        long_one = asyncio.create_task(_outcome(daemon, "x" * 60, 30))
        await asyncio.sleep(0.2)
        second = await _outcome(daemon, "y" * 60, 2)
        too_long = await _outcome(daemon, "z" * 90, 2)
        assert await long_one == ("OK", None)
        again = await _outcome(daemon, "y" * 60, 2)
    assert second[0] == "RESOURCE_EXHAUSTED"
    assert second[1] is not None
    assert too_long == ("RESOURCE_EXHAUSTED", None)  # as it is, it never fits: no retry hint
    assert again == ("OK", None)


async def test_a_client_that_stops_reading_is_cancelled_and_frees_the_engine(box: Box) -> None:
    """The client reads one message, then nothing (HTTP/2 flow control stops the server's
    writes once the window fills): after the write timeout the request is cancelled in the
    engine and the client, when it reads again, is told why."""
    async with in_process(box, EDGEAGENT_SERVER__STREAM_WRITE_TIMEOUT_S="0.5") as daemon:
        request = build_request("read me", params=Parameters(max_tokens=4000))
        # No window growth (BDP): the default 64 KiB window fills in about 2,000 messages.
        options = [("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(box.target, options=options) as channel:
            call = pb_grpc.GenerationServiceStub(channel).GenerateStream(request)
            await call.read()
            freed_after_s = await _until_idle(daemon)
            assert daemon.engine.num_unfinished_requests() == 0
            with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                await _read_to_end(call)
    assert freed_after_s < 5
    assert cancelled.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "read nothing for 0.5 s" in (cancelled.value.details() or "")


async def test_an_http_client_that_stops_reading_is_cut_off_and_frees_the_engine(
    box: Box,
) -> None:
    """The same over the OpenAI HTTP API: a client sends its request and never reads; once the
    socket's buffers are full the server's writes wait, and after the write timeout the stream
    is cut and the request leaves the engine."""
    async with in_process(box, EDGEAGENT_SERVER__STREAM_WRITE_TIMEOUT_S="0.5") as daemon:
        body = json.dumps({"prompt": "read me", "max_tokens": 4000, "stream": True}).encode()
        _reader, writer = await asyncio.open_unix_connection(str(box.root / "run" / "openai.sock"))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))  # fmt: skip
        await writer.drain()
        for _ in range(100):  # until the engine runs it
            if daemon.engine.num_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        freed_after_s = await _until_idle(daemon)
        assert daemon.engine.num_unfinished_requests() == 0
        writer.close()
    assert freed_after_s < 5


async def _until_idle(daemon: InProcess, within_s: float = HANG_S) -> float:
    """Seconds until nothing is under way in the daemon or its engine."""
    started = time.monotonic()
    for _ in range(int(within_s / 0.05)):
        if not len(daemon.daemon.slot) and not daemon.engine.num_unfinished_requests():
            break
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _read_to_end(call: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
    while await call.read() is not grpc.aio.EOF:
        pass


FLOOD = """
import asyncio, sys
import grpc
from edgeagent.client import Parameters, build_request
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

async def main(target, count):
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.GenerationServiceStub(channel)
    request = build_request("flood", params=Parameters(max_tokens=4000))
    calls = [stub.GenerateStream(request) for _ in range(count)]
    await asyncio.gather(*(call.read() for call in calls), return_exceptions=True)
    print("open", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.parametrize("count", [500])
async def test_a_flooding_client_killed_leaves_nothing_running(box: Box, count: int) -> None:
    """A client opens 500 streams (most are refused at once), reads one message of each, and
    is SIGKILLed: within seconds nothing is under way in the daemon or the engine, and a new
    client is served."""
    box.add("a", Behaviour(seed=1, token_s=0.005), current=True)
    async with in_process(box, EDGEAGENT_MODEL__MAX_NUM_SEQS="8") as daemon:
        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOOD, box.target, str(count),
            env={"PYTHONPATH": str(Path(TESTS).parent)}, stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert flood.stdout is not None
            assert await flood.stdout.readline() == b"open\n"
            busy = len(daemon.daemon.slot)
            flood.send_signal(signal.SIGKILL)
        finally:
            await flood.wait()
        cleared_s = await _until_idle(daemon)
        answer = await daemon.generate(max_tokens=4)
    assert 8 <= busy <= 8 + 64
    assert cleared_s < 5
    assert answer.completion_tokens == 4
