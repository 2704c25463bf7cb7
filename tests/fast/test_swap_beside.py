"""Updates beside the serving engine (`updates.swap`): where the fit check says both engines fit,
the candidate's engine starts and is checked while the old one serves, the switch holds no
request, and the old engine stops once its requests are done."""

from __future__ import annotations

import asyncio
import time

import grpc

from edgeagent.client import Parameters, build_request
from edgeagent.fit import FitRequest, GiB, Plan, plan
from edgeagent.v1 import admin_pb2 as admin_pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc
from fast.fakes import Behaviour, FakeProbe
from fast.runner import PROMPT, Box, InProcess, in_process
from fast.test_serving import Load, _stream_until

PROMOTED, ROLLED_BACK = admin_pb.UPDATE_RESULT_PROMOTED, admin_pb.UPDATE_RESULT_ROLLED_BACK


async def _under_load(
    daemon: InProcess, seeds: dict[str, int], work: asyncio.Future[admin_pb.UpdateOutcome]
) -> Load:
    """Six clients streaming while `work` runs, and a little after."""
    load, stop = Load(), asyncio.Event()
    clients = [asyncio.create_task(_stream_until(daemon, stop, load, seeds)) for _ in range(6)]
    await asyncio.sleep(0.2)
    await work
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*clients)
    return load


async def test_auto_on_a_gpu_with_room_swaps_beside_holding_no_request(box: Box) -> None:
    """1. Six clients stream from A (5 ms a token); B's engine takes 1 s to start. 2. Update to
    B with `swap = "auto"` on a GPU with room for both. 3. Method "beside"; the switch held
    requests for a moment (an in-place swap holds them for the whole load); nothing failed;
    every answer is its version's; A's engine was stopped, one engine runs."""
    box.add("a", Behaviour(seed=1, token_s=0.005), current=True)
    box.add("b", Behaviour(seed=2, token_s=0.005, start_s=1.0))
    a, b = box.versions["a"].version, box.versions["b"].version
    async with in_process(box, EDGEAGENT_UPDATES__SWAP="auto") as daemon:
        said = (await daemon.status()).next_swap
        update = asyncio.ensure_future(daemon.update(b))
        load = await _under_load(daemon, {a: 1, b: 2}, update)
        outcome = update.result()
        live = [engine.behaviour.seed for engine in daemon.engines.live]
    assert said.startswith("beside: a second engine of "), said
    assert (outcome.result, outcome.method) == (PROMOTED, "beside"), outcome
    assert outcome.reload_s >= 1.0  # the start happened, outside the pause
    # Held for a moment, not for the load an in-place swap holds them through (50 ms when quiet)
    assert outcome.pause_s < outcome.reload_s / 4
    assert load.failures == []
    assert load.mismatched == []
    assert load.versions == {a, b}
    assert live == [2]  # B's


async def test_a_candidate_that_fails_beside_leaves_serving_untouched(box: Box) -> None:
    """The candidate's smoke test fails: rolled back and marked bad without a pause; A's
    engine never stopped; the candidate's engine was stopped; nothing failed."""
    box.add("a", Behaviour(seed=1, token_s=0.005), current=True)
    box.add("b", Behaviour(seed=2, stream_error="garbage weights"))
    a, b = box.versions["a"].version, box.versions["b"].version
    async with in_process(box, EDGEAGENT_UPDATES__SWAP="auto") as daemon:
        update = asyncio.ensure_future(daemon.update(b))
        load = await _under_load(daemon, {a: 1}, update)
        outcome, status = update.result(), await daemon.status()
        closed = [engine.closed for engine in daemon.engines.started]
    assert (outcome.result, outcome.method, outcome.pause_s) == (ROLLED_BACK, "beside", 0.0)
    assert "garbage weights" in outcome.reason
    assert b in status.bad_versions
    assert status.version == a
    assert load.failures == []
    assert load.versions == {a}
    assert closed == [False, True]  # A's engine served throughout; B's was stopped


async def test_a_stream_past_the_hold_on_the_old_engine_is_ended_with_the_reason(box: Box) -> None:
    """A stream of 200 tokens at 20 ms (4 s) runs on A; the update to B switches at once, and
    A's engine waits `hold_s` (0.5 s) for it, then aborts it with the reason and stops."""
    box.add("a", Behaviour(seed=1, token_s=0.02), current=True)
    box.add("b", Behaviour(seed=2))
    b = box.versions["b"].version
    async with in_process(box, EDGEAGENT_UPDATES__SWAP="beside",
                          EDGEAGENT_UPDATES__HOLD_S="0.5") as daemon:  # fmt: skip
        request = build_request(PROMPT, params=Parameters(max_tokens=200, temperature=0))
        async with grpc.aio.insecure_channel(box.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            stream = stub.GenerateStream(request)
            await stream.read()  # under way on A
            started = time.monotonic()
            outcome = await daemon.update(b)
            try:
                while await stream.read() is not grpc.aio.EOF:
                    pass
                ended = None
            except grpc.aio.AioRpcError as error:
                ended = error
        took = time.monotonic() - started
        after = await daemon.generate()
        a_engine = daemon.engines.started[0]
    assert (outcome.result, outcome.method) == (PROMOTED, "beside")
    assert ended is not None
    assert ended.code() == grpc.StatusCode.UNAVAILABLE
    assert "replaced by" in (ended.details() or "")
    assert took < 3.0  # not the stream's 4 s
    assert a_engine.closed
    assert after.model_version == b


async def test_no_room_for_two_swaps_in_place_and_says_so(box: Box) -> None:
    """A GPU with room for one engine only (the fit check counts what the serving engine
    holds): "auto" reloads in place, as before."""
    box.add("a", Behaviour(seed=1), current=True)
    box.add("b", Behaviour(seed=2))
    probe = FakeProbe(total_gib=24, free_gib=20)
    async with in_process(box, probe, EDGEAGENT_UPDATES__SWAP="auto") as daemon:
        probe.free = int(0.5 * GiB)  # what the serving engine leaves
        said = (await daemon.status()).next_swap
        outcome = await daemon.update(box.versions["b"].version)
    assert said.startswith("in place: no room for a second engine: "), said
    assert (outcome.result, outcome.method) == (PROMOTED, "copy"), outcome


async def test_a_memory_budget_counts_the_serving_engine(box: Box) -> None:
    """A GPU with room for many engines, but `memory.budget_gib` with room for one: the budget
    is the daemon's, so even `swap = "beside"` reloads in place rather than run two engines."""
    box.add("a", Behaviour(seed=1), current=True)
    box.add("b", Behaviour(seed=2))
    probe = FakeProbe(total_gib=80, free_gib=70)
    one = _one_engine(box, probe)
    budget = f"{1.5 * one.predicted_bytes / GiB:.3f}"
    async with in_process(box, probe, EDGEAGENT_UPDATES__SWAP="beside",
                          EDGEAGENT_MEMORY__BUDGET_GIB=budget) as daemon:  # fmt: skip
        outcome = await daemon.update(box.versions["b"].version)
        live = [engine.behaviour.seed for engine in daemon.engines.live]
    assert (outcome.result, outcome.method) == (PROMOTED, "copy"), outcome
    assert live == [2]


async def test_a_second_engine_with_less_context_than_the_first_swaps_in_place(box: Box) -> None:
    """The context and KV cache are derived (the defaults). Within the budget a second engine
    would fit only with half the serving engine's KV cache, so a shorter context or fewer
    sequences: clients would lose what they had, so the swap is in place, and status says so."""
    box.add("a", Behaviour(seed=1), current=True)
    box.add("b", Behaviour(seed=2))
    probe = FakeProbe(total_gib=80, free_gib=70)
    one = _one_engine(box, probe)
    budget = 2 * (one.weight_bytes + one.overhead_bytes) + 1.5 * one.kv_cache_bytes
    async with in_process(box, probe, EDGEAGENT_UPDATES__SWAP="beside",
                          EDGEAGENT_MEMORY__BUDGET_GIB=f"{budget / GiB}") as daemon:  # fmt: skip
        said = (await daemon.status()).next_swap
        outcome = await daemon.update(box.versions["b"].version)
    assert "less than the serving engine's" in said, said
    assert (outcome.result, outcome.method) == (PROMOTED, "copy"), outcome


def _one_engine(box: Box, probe: FakeProbe) -> Plan:
    """The fit check's plan for version "a" alone on `probe`'s device, with the box's settings."""
    request = FitRequest.from_settings(box.settings())
    return plan(box.versions["a"].architecture, probe.read(), request)
