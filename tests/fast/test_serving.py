"""Serving through the slot, in a real daemon with fake engines: each request keeps the version
it was admitted with; requests wait during a swap and none fails; cancellation reaches the
engine; shutdown drains, then cancels with a reason."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeagent.client import Parameters, build_request
from edgeagent.v1 import generation_pb2_grpc as pb_grpc
from fast.fakes import Behaviour, expected_words
from fast.runner import PROMPT, Box, InProcess, in_process


@dataclass
class Load:
    completed: int = 0
    failures: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)


async def _stream_until(
    daemon: InProcess, stop: asyncio.Event, load: Load, seeds: dict[str, int]
) -> None:
    request = build_request(PROMPT, params=Parameters(max_tokens=6, temperature=0))
    async with grpc.aio.insecure_channel(daemon.box.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        while not stop.is_set():
            try:
                messages = [m async for m in stub.GenerateStream(request)]
            except grpc.aio.AioRpcError as error:
                load.failures.append(f"{error.code().name}: {error.details()}")
                continue
            version = messages[-1].model_version
            load.versions.add(version)
            text = "".join(m.text for m in messages)
            if text != expected_words(seeds[version], PROMPT, 6):
                load.mismatched.append(f"{version}: {text}")
            load.completed += 1


async def test_updates_under_load_fail_nothing_and_each_answer_is_its_versions(box: Box) -> None:
    """1. Six clients stream continuously (each token 5 ms). 2. A → B, B → A (rollback), A → B
    again, each reload taking 0.3 s. 3. No request failed; every answer's words are those of
    the version its reply names: no request ever straddled two versions."""
    box.add("a", Behaviour(seed=1, token_s=0.005, reload_s=0.3), current=True)
    box.add("b", Behaviour(seed=2, token_s=0.005, reload_s=0.3))
    a, b = box.versions["a"].version, box.versions["b"].version
    seeds = {a: 1, b: 2}
    async with in_process(box) as daemon:
        load, stop = Load(), asyncio.Event()
        clients = [asyncio.create_task(_stream_until(daemon, stop, load, seeds)) for _ in range(6)]
        await asyncio.sleep(0.3)
        results = [(await daemon.update(b)).result, (await daemon.rollback()).result]
        await asyncio.sleep(0.2)
        results.append((await daemon.update(b)).result)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*clients)
    assert results == [1, 1, 1]
    assert load.failures == []
    assert load.mismatched == []
    assert load.versions == {a, b}
    assert load.completed > 30


async def test_a_cancelled_stream_is_aborted_in_the_engine(box: Box) -> None:
    box.add("a", Behaviour(seed=1, token_s=0.01), current=True)
    async with in_process(box) as daemon:
        request = build_request(PROMPT, params=Parameters(max_tokens=500))
        async with grpc.aio.insecure_channel(box.target) as channel:
            call = pb_grpc.GenerationServiceStub(channel).GenerateStream(request)
            await call.read()
            assert daemon.engine.num_unfinished_requests() == 1
            call.cancel()
        for _ in range(100):
            if daemon.engine.num_unfinished_requests() == 0 and not len(daemon.daemon.slot):
                break
            await asyncio.sleep(0.01)
        assert daemon.engine.num_unfinished_requests() == 0
        assert len(daemon.daemon.slot) == 0


async def _read_to_end(stream: grpc.aio.UnaryStreamCall) -> str:  # type: ignore[type-arg]
    """How the stream ended: "finished N" (tokens), or the status it failed with."""
    last = None
    try:
        while (message := await stream.read()) is not grpc.aio.EOF:
            last = message
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name}: {error.details()}"
    return f"finished {last.completion_tokens if last else 0}"


@pytest.mark.parametrize(("grace_s", "finishes"), [(5.0, True), (0.2, False)])
async def test_shutdown_drains_then_cancels_with_a_reason(
    box: Box, grace_s: float, finishes: bool
) -> None:
    """SIGTERM's path: health goes NOT_SERVING (a watcher sees it), new requests are refused,
    the stream under way finishes within the grace, or is cancelled in the engine and told
    why; exit 0."""
    box.add("a", Behaviour(seed=1, token_s=0.01), current=True)
    async with in_process(box, EDGEAGENT_SERVER__DRAIN_GRACE_S=str(grace_s)) as daemon:
        async with grpc.aio.insecure_channel(box.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stream = stub.GenerateStream(build_request(PROMPT, params=Parameters(max_tokens=100)))
            await stream.read()
            daemon.daemon.should_exit = True
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(build_request("new work"))
            started = time.monotonic()
            outcome = await _read_to_end(stream)
        assert await daemon.exit_code() == 0
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (refused.value.details() or "")
    if finishes:
        assert outcome == "finished 100"
    else:
        assert outcome.startswith("UNAVAILABLE: the server shut down"), outcome
        assert "0.2 s drain grace period" in outcome
        assert time.monotonic() - started < 2
