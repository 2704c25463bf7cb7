"""docs/update-failures.md, row by row: each way an update can fail, what serves afterwards, what
health and status say, and what the journal says once the daemon has restarted.

The real daemon (store, journal, updater, slot, gRPC servers) runs with fake engines whose
failures come with the versions (`fakes.Behaviour`). Rows K1-K7 SIGKILL a daemon process at
each step of an update (`EDGEAGENT_FAILPOINT`) and start it again.
"""

from __future__ import annotations

import asyncio
import math
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from waits import HANG_S

from edgeagent.v1 import admin_pb2 as admin_pb
from fast.fakes import Behaviour, expected_words
from fast.runner import PROMPT, Box, Calls, InProcess, child_process, in_process

SERVING, NOT_SERVING = (
    health_pb2.HealthCheckResponse.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING,
)
PROMOTED, REFUSED = admin_pb.UPDATE_RESULT_PROMOTED, admin_pb.UPDATE_RESULT_REFUSED
ROLLED_BACK, FAILED = admin_pb.UPDATE_RESULT_ROLLED_BACK, admin_pb.UPDATE_RESULT_FAILED
INTERRUPTED = admin_pb.UPDATE_RESULT_INTERRUPTED
FAST_CHECKS = {"EDGEAGENT_MODEL__HEALTH_CHECK_S": "0.1"}


async def _answers_as(daemon: Calls, seed: int, version: str) -> None:
    """The daemon answers, from `version`, with the words of the fake model of `seed`."""
    reply = await daemon.generate()
    assert (reply.model_version, reply.text) == (version, expected_words(seed, PROMPT, 6))


async def _after_restart(box: Box, **settings: str) -> admin_pb.Status:
    """Start a new daemon on the box (as systemd would) and return its status."""
    async with in_process(box, **settings) as daemon:
        status = await daemon.status()
        await _answers_as(daemon, _seed_of(box, status.version), status.version)
        return status


def _seed_of(box: Box, version: str) -> int:
    name = next(name for name, m in box.versions.items() if m.version == version)
    return {"a": 1, "b": 2}.get(name, 9)


async def _refused_or_rolled_back(
    box: Box, candidate: str, result: int, reason: str, *, bad: bool, **settings: str
) -> None:
    """Update to `candidate`: the outcome is `result` naming `reason`; A serves throughout and
    after a restart; the candidate is marked bad or not."""
    a, version = box.versions["a"].version, box.versions[candidate].version
    async with in_process(box, **settings) as daemon:
        outcome = await daemon.update(version)
        assert (outcome.result, outcome.version) == (result, version), outcome.reason
        assert reason in outcome.reason
        await _answers_as(daemon, 1, a)
        assert await daemon.health() == SERVING
        status = await daemon.status()
        assert (status.version, status.state) == (a, "serving")
        assert status.history[0].result == result
        assert (version in status.bad_versions) is bad
    status = await _after_restart(box)
    assert status.version == a
    assert status.history[0].result == result
    assert (version in status.bad_versions) is bad
    assert box.store.refs().current == a
    assert box.journal.pending is None


async def test_row_01_verification_fails(box: Box) -> None:
    config = box.store.model_dir(box.versions["b"].version) / "fake-engine.json"
    blob = config.resolve()
    blob.chmod(0o644)
    blob.write_text(blob.read_text().replace('"seed": 2', '"seed": 3'))
    await _refused_or_rolled_back(box, "b", REFUSED, "failed verification", bad=True)


async def test_row_02_another_layout_that_does_not_fit(box: Box) -> None:
    """Its widest layer's activations alone (2048 tokens x 2 x 2M x 4 bytes) outgrow the GPU."""
    box.add("huge", quantized=False, intermediate_size=2_000_000)
    await _refused_or_rolled_back(box, "huge", REFUSED, "does not fit", bad=False)


async def test_row_03_requests_outlast_the_hold(box: Box) -> None:
    """A 2 s stream is under way; the hold is 0.5 s: refused, and the stream completes."""
    box.add("slow", Behaviour(seed=1, token_s=0.02), current=True)
    async with in_process(box, EDGEAGENT_UPDATES__HOLD_S="0.5") as daemon:
        stream = asyncio.create_task(daemon.generate(max_tokens=100))
        await asyncio.sleep(0.2)
        outcome = await daemon.update(box.versions["b"].version)
        long_reply = await stream
    assert outcome.result == REFUSED
    assert "1 request(s) still running after 0.5 s" in outcome.reason
    assert long_reply.completion_tokens == 100
    assert box.versions["b"].version not in box.journal.bad


async def test_row_04_reload_raises(box: Box) -> None:
    box.add("broken", Behaviour(seed=4, reload_error="CUDA error: an illegal memory access"))
    await _refused_or_rolled_back(box, "broken", ROLLED_BACK, "illegal memory access", bad=True)


async def test_row_05_a_failed_restart_puts_the_old_version_back_on_a_new_engine(box: Box) -> None:
    """The bug this design fixes: after a failed restart the old version is started again on a
    new engine, and requests are answered by it, not by the engine the restart shut down."""
    other = box.add("fp16", Behaviour(seed=5, start_error="out of memory"), quantized=False)
    async with in_process(box) as daemon:
        first = daemon.engine
        outcome = await daemon.update(other.version)
        await _answers_as(daemon, 1, box.versions["a"].version)
        assert first.closed
        assert daemon.engine is not first
        assert len(daemon.engines.live) == 1
    assert (outcome.result, outcome.method) == (ROLLED_BACK, "restart")
    assert "the engine failed to start" in outcome.reason
    await _refused_or_rolled_back(box, "fp16", REFUSED, "marked bad", bad=True)


async def test_row_06_smoke_test_raises(box: Box) -> None:
    box.add("mute", Behaviour(seed=6, stream_error="device-side assert triggered"))
    await _refused_or_rolled_back(box, "mute", ROLLED_BACK, "smoke test failed", bad=True)


@pytest.mark.parametrize("quantized", [True, False], ids=["reload", "restart"])
async def test_row_07_smoke_test_not_finite(box: Box, quantized: bool) -> None:
    box.add("nan", Behaviour(seed=7, logprob=math.nan), quantized=quantized)
    await _refused_or_rolled_back(box, "nan", ROLLED_BACK, "non-finite", bad=True)


@pytest.mark.parametrize("quantized", [True, False], ids=["reload", "restart"])
async def test_row_14_the_quality_gate_refuses_a_finite_but_worse_candidate(
    box: Box, quantized: bool
) -> None:
    """Finite output (the smoke test passes) but every prompt token is 2 nats less likely than
    the serving version makes it: perplexity x7.4, refused with the figures, marked bad."""
    box.add("worse", Behaviour(seed=14, prompt_logprob=-3.0), quantized=quantized)
    await _refused_or_rolled_back(box, "worse", ROLLED_BACK, "quality gate refused", bad=True)
    reason = box.journal.bad[box.versions["worse"].version]
    assert "perplexity 20.086 against 2.718 (7.39x, at most 1.20x allowed)" in reason, reason


async def test_the_quality_gate_passes_a_close_candidate_and_can_be_turned_off(box: Box) -> None:
    box.add("close", Behaviour(seed=15, prompt_logprob=-1.1))  # perplexity x1.105
    box.add("worse", Behaviour(seed=16, prompt_logprob=-3.0))
    async with in_process(box) as daemon:
        assert (await daemon.update(box.versions["close"].version)).result == PROMOTED
    async with in_process(box, EDGEAGENT_UPDATES__QUALITY_GATE="false") as daemon:
        assert (await daemon.update(box.versions["worse"].version)).result == PROMOTED


# -- 15-18: an engine that stops answering during an update (issue 26) -------------------------

STEP_BOUND = {"EDGEAGENT_UPDATES__STEP_TIMEOUT_S": "1", **FAST_CHECKS}


async def _hung_and_rolled_back(box: Box, candidate: str, reason: str, **settings: str) -> None:
    """Update to `candidate`, whose engine stops answering; a client arrives while the update
    holds the gate. The update ends `rolled_back` naming `reason`, the candidate is marked bad,
    the engine that stopped answering is stopped, A serves on a fresh engine and answers the
    held client, health is SERVING; so it stays after a restart."""
    a, version = box.versions["a"].version, box.versions[candidate].version
    async with in_process(box, **{**STEP_BOUND, **settings}) as daemon:
        first = daemon.engine
        update = asyncio.create_task(daemon.update(version))
        await _until_state(daemon, "swapping")
        held = asyncio.create_task(daemon.generate())
        outcome = await update
        reply = await held
        assert (outcome.result, outcome.version) == (ROLLED_BACK, version), outcome.reason
        assert reason in outcome.reason
        assert (reply.model_version, reply.text) == (a, expected_words(1, PROMPT, 6))
        assert first.closed
        assert daemon.engine is not first
        assert [e for e in daemon.engines.live] == [daemon.engine]
        assert await daemon.health() == SERVING
        status = await daemon.status()
        assert (status.version, status.state) == (a, "serving")
        assert status.history[0].result == ROLLED_BACK
        assert reason in status.bad_versions[version]
    after = await _after_restart(box)
    assert after.version == a
    assert after.history[0].result == ROLLED_BACK
    assert version in after.bad_versions
    assert box.journal.pending is None


async def _until_state(daemon: InProcess, state: str, within_s: float = HANG_S) -> None:
    for _ in range(int(within_s / 0.01)):
        if daemon.daemon.slot.state == state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the slot was not {state} within {within_s} s")


@pytest.mark.timeout(120)  # a hang guard: these rows test that nothing hangs
async def test_row_15_the_engine_hangs_after_a_reload(box: Box) -> None:
    """Issue 26: the reload returns, then the engine never runs another step."""
    box.add("wedge", Behaviour(seed=15, hang_after_reload=True))
    await _hung_and_rolled_back(box, "wedge", "the smoke test did not finish within")


@pytest.mark.timeout(120)  # a hang guard: these rows test that nothing hangs
@pytest.mark.parametrize("quantized", [True, False], ids=["reload", "restart"])
async def test_row_16_the_smoke_test_hangs(box: Box, quantized: bool) -> None:
    box.add("silent", Behaviour(seed=16, stream_hangs=True), quantized=quantized)
    await _hung_and_rolled_back(box, "silent", "the smoke test did not finish within")


@pytest.mark.timeout(120)  # a hang guard: these rows test that nothing hangs
async def test_row_17_the_engine_dies_during_the_smoke_test(box: Box) -> None:
    """Its stream goes silent; the liveness watch notices within a health check (0.1 s here),
    long before the step's bound (30 s here)."""
    box.add("fatal", Behaviour(seed=17, dies_in_stream=True))
    started = asyncio.get_running_loop().time()
    await _hung_and_rolled_back(box, "fatal", "the engine died during the smoke test",
                                EDGEAGENT_UPDATES__STEP_TIMEOUT_S="30")  # fmt: skip
    assert asyncio.get_running_loop().time() - started < 20


@pytest.mark.timeout(120)  # a hang guard: these rows test that nothing hangs
async def test_row_18_the_reload_does_not_finish(box: Box) -> None:
    box.add("stuck", Behaviour(seed=18, reload_s=3600))
    await _hung_and_rolled_back(box, "stuck", "did not finish within")


async def _cannot_put_back(box: Box, candidate: str, reason: str) -> None:
    """The candidate fails and the old version does not come back: nothing serves, health and
    status say so, the daemon exits 1; restarted, it serves the old version."""
    a, version = box.versions["a"].version, box.versions[candidate].version
    async with in_process(box, **FAST_CHECKS) as daemon:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await daemon.update(version)
        status = await daemon.status()
        health = await daemon.health()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await daemon.generate()
        assert await daemon.exit_code() == 1
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason in (failed.value.details() or "")
    assert health == NOT_SERVING
    assert status.version == ""
    assert status.state in ("empty", "draining")  # the daemon may already be on its way out
    assert reason in status.problem
    assert status.history[0].result == FAILED
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # The daemon exits a tick (0.1 s) after the update: a loaded runner may meet its drain.
    assert any(why in (refused.value.details() or "") for why in ("no model is loaded",
                                                                  "shutting down"))  # fmt: skip
    after = await _after_restart(box)
    assert after.version == a
    assert after.history[0].result == FAILED
    assert version in after.bad_versions


async def test_row_08_the_old_version_cannot_be_put_back_by_reload(box: Box) -> None:
    """The reload kills the engine, and a fresh engine on A fails to start too."""
    box.add("a", Behaviour(seed=1, fail_starts_after=1), current=True)
    box.add("wreck", Behaviour(seed=8, reload_error="Xid 79", reload_kills_engine=True))
    await _cannot_put_back(box, "wreck", "could not put")


async def test_row_09_the_old_version_cannot_be_put_back_by_restart(box: Box) -> None:
    box.add("a", Behaviour(seed=1, fail_starts_after=1), current=True)
    box.add("fp16", Behaviour(seed=5, start_error="out of memory"), quantized=False)
    await _cannot_put_back(box, "fp16", "could not put")


async def test_row_10_engine_dies_in_probation(box: Box) -> None:
    a, b = box.versions["a"].version, box.versions["b"].version
    async with in_process(box, **FAST_CHECKS) as daemon:
        assert (await daemon.update(b)).result == PROMOTED
        assert (await daemon.status()).probation_left_s > 250
        daemon.engine.kill()
        status = await _until_history(daemon, "auto_rollback")
        await _answers_as(daemon, 1, a)
    assert (status.version, status.probation_left_s) == (a, 0)
    assert status.history[0].result == PROMOTED
    assert "engine died" in status.bad_versions[b]
    after = await _after_restart(box)
    assert after.version == a
    assert [o.kind for o in after.history] == ["auto_rollback", "update"]


async def test_row_11_engine_dies_in_probation_and_the_old_version_fails_to_start(
    box: Box,
) -> None:
    box.add("a", Behaviour(seed=1, fail_starts_after=1), current=True)
    a, b = box.versions["a"].version, box.versions["b"].version
    async with in_process(box, **FAST_CHECKS) as daemon:
        assert (await daemon.update(b)).result == PROMOTED
        daemon.engine.kill()
        assert await daemon.exit_code() == 1
    assert box.store.refs().current == a
    after = await _after_restart(box)
    assert after.version == a
    assert (after.history[0].kind, after.history[0].result) == ("auto_rollback", FAILED)
    assert b in after.bad_versions


async def test_row_12_engine_dies_after_probation(box: Box) -> None:
    b = box.versions["b"].version
    settings = {**FAST_CHECKS, "EDGEAGENT_UPDATES__PROBATION_S": "0.3"}
    async with in_process(box, **settings) as daemon:
        assert (await daemon.update(b)).result == PROMOTED
        await asyncio.sleep(0.5)
        assert box.journal.pending is None  # probation over
        daemon.engine.kill()
        assert await daemon.exit_code() == 1
    after = await _after_restart(box)
    assert after.version == b
    assert b not in after.bad_versions


async def test_row_13_an_orderly_stop_in_probation_resumes_it(box: Box) -> None:
    a, b = box.versions["a"].version, box.versions["b"].version
    settings = {**FAST_CHECKS, "EDGEAGENT_UPDATES__PROBATION_S": "30"}
    async with in_process(box, **settings) as daemon:
        assert (await daemon.update(b)).result == PROMOTED
    assert await_exit_code_was_clean(box)
    async with in_process(box, **settings) as daemon:
        status = await daemon.status()
        assert status.version == b
        assert 20 < status.probation_left_s < 30
        daemon.engine.kill()
        status = await _until_history(daemon, "auto_rollback")
    assert status.version == a
    assert b in status.bad_versions


def await_exit_code_was_clean(box: Box) -> bool:
    pending = box.journal.pending
    return pending is not None and pending.step == "probation" and pending.stopped_cleanly


async def _until_history(daemon: Calls, kind: str, within_s: float = HANG_S) -> admin_pb.Status:
    for _ in range(int(within_s / 0.05)):
        status = await daemon.status()
        if status.history and status.history[0].kind == kind:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind} within {within_s} s")


# -- K1-K7: the daemon killed at each step, then started again --------------------------------

KILLS = [  # row, failpoint, what the journal says of B, whether B is marked bad
    ("K1-staged", "update.staged", INTERRUPTED, False),
    ("K2-verified", "update.verified", INTERRUPTED, False),
    ("K3-loading", "update.loading", ROLLED_BACK, True),
    ("K4-smoke-test", "load.smoke_test:2", ROLLED_BACK, True),
    ("K5-promoted-not-journaled", "update.promoted", ROLLED_BACK, True),
    ("K6-probation", "update.probation", PROMOTED, True),
]


async def test_killed_at_every_step_of_an_update(tmp_path: Path) -> None:
    """For each step (each on its own box, all at once): 1. A daemon process serves A. 2. An
    update to B; the daemon SIGKILLs itself at the step. 3. Started again, it serves A (a
    version that passed its checks), the store's current is A, nothing is pending, and the
    journal says what happened to B."""
    # Each box is named K1..K6 alone: a Unix socket's path has 107 bytes, and pytest-xdist's
    # worker directory makes the temporary path longer.
    outcomes = await asyncio.gather(
        *(_killed_during_an_update(_two_versions(tmp_path / row[:2]), failpoint, result, bad)
          for row, failpoint, result, bad in KILLS),
        return_exceptions=True,
    )  # fmt: skip
    failures = {row: repr(o) for (row, *_), o in zip(KILLS, outcomes, strict=True) if o}
    assert failures == {}


def _two_versions(root: Path) -> Box:
    box = Box(root)
    box.add("a", Behaviour(seed=1), current=True)
    box.add("b", Behaviour(seed=2))
    return box


async def _killed_during_an_update(box: Box, failpoint: str, result: int, bad: bool) -> None:
    a, b = box.versions["a"].version, box.versions["b"].version
    with child_process(box, EDGEAGENT_FAILPOINT=failpoint) as killed:
        await killed.until_serving()
        with pytest.raises(grpc.aio.AioRpcError):
            await killed.update(b)
        assert await asyncio.to_thread(killed.wait) == -signal.SIGKILL, killed.tail()
    with child_process(box, "restarted.log") as restarted:
        await restarted.until_serving()
        status = await restarted.status()
        await _answers_as(restarted, 1, a)
        restarted.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(restarted.wait) == 0, restarted.tail()
    assert status.version == a
    assert box.store.refs().current == a
    assert box.journal.pending is None
    assert status.history[0].result == result, status.history[0].reason
    assert "the daemon died" in status.history[0].reason or result == INTERRUPTED
    assert (b in status.bad_versions) is bad


async def test_k7_killed_after_importing_a_drop(box: Box) -> None:
    """A drop is claimed and imported; the daemon dies before its update. Started again, the
    daemon takes the drop from `taken/` again: B is promoted and the drop filed in done/."""
    source = box.root / "sources" / "b"
    with child_process(box, EDGEAGENT_FAILPOINT="drop.imported") as killed:
        await killed.until_serving()
        incoming = box.drop / "release-b"
        await asyncio.to_thread(_copy_tree, source, incoming)
        (incoming / "READY").touch()
        assert await asyncio.to_thread(killed.wait) == -signal.SIGKILL, killed.tail()
    assert (box.drop / "taken" / "release-b").is_dir()
    with child_process(box, "restarted.log") as restarted:
        await restarted.until_serving()
        await _until_exists(box.drop / "done" / "release-b")
        await _answers_as(restarted, 2, box.versions["b"].version)
    assert list((box.drop / "taken").iterdir()) == []


def _copy_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())


async def _until_exists(path: Path, within_s: float = HANG_S) -> None:
    for _ in range(int(within_s / 0.05)):
        if await asyncio.to_thread(path.exists):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {within_s} s")
