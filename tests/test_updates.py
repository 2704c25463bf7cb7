"""Hot swaps through the admin API, with clients streaming the whole time.

The session's real engine serves version A (the embedded 4-bit build); version B has the same
layout and other weights. A separate gRPC server with the admin service runs on that engine.
Updates to another layout (the fp16 tiny model) restart the engine: those tests run their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from conftest import TEST_CONTEXT, TEST_LIMITS, wait_until_engine_idle
from hub_server import HubServer

from edgeagent.artifacts.fetch import HubFetcher, HubTarget
from edgeagent.artifacts.manifest import ImportSource, Manifest
from edgeagent.artifacts.store import ModelStore
from edgeagent.client import Parameters, build_request
from edgeagent.engine import Engine, EngineConfig, SamplingOptions, VllmEngine
from edgeagent.engine_host import EngineFactory, EngineHost
from edgeagent.errors import EngineDeadError
from edgeagent.gpu import SystemMemoryProbe
from edgeagent.server.admin import AdminService
from edgeagent.server.app import ApiServer
from edgeagent.server.inflight import InflightRequests
from edgeagent.server.service import GenerationService, ServedModel
from edgeagent.settings import ModelSettings, ServerSettings, Settings
from edgeagent.updates.hub_poll import HubPoller
from edgeagent.updates.journal import UpdateJournal, UpdateOutcome
from edgeagent.updates.pipeline import Updater
from edgeagent.updates.sources import DropDirectory, take_drop
from edgeagent.v1 import admin_pb2 as admin_pb
from edgeagent.v1 import admin_pb2_grpc as admin_grpc
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

# The long one spans several KV blocks: a prefix cache kept across an update would answer it
# with the old weights' keys and values.
PROMPTS = (
    "The library opens",
    "Seven bridges cross",
    "At dawn the ferry left the northern harbour with forty passengers, three bicycles, a crate "
    "of oranges and a letter addressed to the lighthouse keeper, who had not written back in",
)
GREEDY = SamplingOptions(max_tokens=16, temperature=0)


@dataclass
class Load:
    """Clients streaming until told to stop; every failure and the longest silence recorded."""

    completed: int = 0
    failures: list[str] = field(default_factory=list)
    longest_gap_s: float = 0.0
    versions: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def fresh_b_outputs(tiny_model_b: Path) -> list[str]:
    """What a freshly started engine on version B says: the reference after an update."""
    return _fresh_outputs(tiny_model_b)


@pytest.fixture(scope="module")
def fresh_fp16_outputs(tiny_fp16: Path) -> list[str]:
    return _fresh_outputs(tiny_fp16)


def _fresh_outputs(model_dir: Path) -> list[str]:
    config = EngineConfig(model_dir, kv_cache_bytes=64 << 20, max_num_seqs=2,
                          max_model_len=TEST_CONTEXT)  # fmt: skip
    engine = VllmEngine.start(config)
    try:
        return asyncio.run(_greedy_all(engine))
    finally:
        engine.shutdown()


@dataclass
class Target:
    """An admin-enabled gRPC server over an updater and the engine host it updates."""

    address: str  # generation
    admin: str  # the admin service's own socket
    updater: Updater
    host: EngineHost
    journal_path: Path


@contextlib.asynccontextmanager
async def serving(
    store: ModelStore, version: Manifest, factory: EngineFactory, tmp_path: Path
) -> AsyncIterator[Target]:
    store.activate(version.version)
    settings = Settings(
        state_dir=tmp_path / "state",
        model=ModelSettings(max_model_len=TEST_CONTEXT, kv_cache_gib=0.0625, max_num_seqs=4),
    )
    host = EngineHost(settings, store, factory, SystemMemoryProbe())
    engine = await asyncio.to_thread(host.start, version, host.plan(version))
    inflight = InflightRequests()
    service = GenerationService(engine, ServedModel(version.model_id, version.version),
                                TEST_LIMITS, inflight)  # fmt: skip

    def promoted(engine: Engine, manifest: Manifest) -> None:
        service.use(engine, ServedModel(manifest.model_id, manifest.version))

    journal_path = tmp_path / "updates.json"
    updater = Updater(store, host, inflight, version, on_promoted=promoted,
                      journal=UpdateJournal(journal_path), hold_s=30, probation_s=120)  # fmt: skip
    app_socket, admin_socket = tmp_path / "app.sock", tmp_path / "admin.sock"
    server = ApiServer(service, ServerSettings(), app_socket, AdminService(updater), admin_socket)
    await server.start()
    await server.set_serving(True)
    try:
        yield Target(f"unix:{app_socket}", f"unix:{admin_socket}", updater, host, journal_path)
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def admin_target(
    engine: VllmEngine, model_store: ModelStore, tiny_4bit: Manifest, tmp_path: Path
) -> AsyncIterator[Target]:
    """The session's engine behind an updater: reloads only, never a restart."""
    async with serving(model_store, tiny_4bit, lambda config: engine, tmp_path) as target:
        yield target
        if target.updater.serving.version != tiny_4bit.version:  # leave the engine on A
            await engine.reload_weights(model_store.model_dir(tiny_4bit.version))
        await wait_until_engine_idle(engine)


async def test_updates_under_load_fail_no_request_and_serve_the_new_weights(
    admin_target: Target, engine: VllmEngine, tiny_4bit: Manifest,
    tiny_4bit_b: Manifest, fresh_b_outputs: list[str],
) -> None:  # fmt: skip
    """1. Four clients stream continuously. 2. Update A → B: promoted; the engine now answers
    exactly as a fresh engine on B. 3. Roll back to A: promoted; A's answers again.
    4. No request failed; replies name the version that produced them."""
    target = admin_target
    on_a = await _greedy_all(engine)
    load, stop = Load(), asyncio.Event()
    clients = [asyncio.create_task(_stream_until(target.address, stop, load, i)) for i in range(4)]
    async with grpc.aio.insecure_channel(target.admin) as channel:
        admin = admin_grpc.AdminServiceStub(channel)
        await asyncio.sleep(1.0)
        to_b = await admin.Update(admin_pb.UpdateRequest(version=tiny_4bit_b.version[:8]))
        await asyncio.sleep(0.5)
        on_b = await _greedy_all(engine)
        back = await admin.Rollback(admin_pb.RollbackRequest())
        await asyncio.sleep(1.0)
        status = await admin.GetStatus(admin_pb.GetStatusRequest())
    stop.set()
    await asyncio.gather(*clients)

    assert to_b.result == admin_pb.UPDATE_RESULT_PROMOTED, to_b.reason
    assert back.result == admin_pb.UPDATE_RESULT_PROMOTED, back.reason
    assert on_b == fresh_b_outputs
    assert on_b != on_a
    assert await _greedy_all(engine) == on_a
    assert load.failures == []
    assert load.completed >= 8
    assert load.versions == {tiny_4bit.version, tiny_4bit_b.version}
    assert (status.version, status.previous_version) == (tiny_4bit.version, tiny_4bit_b.version)
    assert [o.kind for o in status.history] == ["rollback", "update"]
    assert {o.method for o in status.history} == {"reload"}
    print(f"\nupdate pause {to_b.pause_s:.3f} s (reload {to_b.reload_s:.3f} s), rollback pause "
          f"{back.pause_s:.3f} s; longest gap a client saw {load.longest_gap_s:.3f} s; "
          f"{load.completed} requests, 0 failed")  # fmt: skip


async def test_corrupt_and_failing_candidates_leave_the_old_version_serving(
    admin_target: Target, model_store: ModelStore, tiny_model_b: Path,
    tiny_4bit: Manifest, engine: VllmEngine, tmp_path: Path,
) -> None:  # fmt: skip
    """1. A candidate whose blob was altered after it was stored: refused at verification.
    2. A candidate with NaN quantization scales (same layout): loaded, fails its smoke test,
    A's weights go back in. 3. Both are marked bad, in a journal that survives a restart, and
    not tried again. A serves the same greedy output as before throughout."""
    target, updater = admin_target.admin, admin_target.updater
    on_a = await _greedy_all(engine)
    copy = tmp_path / "b-with-notes"
    shutil.copytree(tiny_model_b, copy)
    (copy / "notes.json").write_text('{"release": "2026-11"}')
    corrupt = model_store.import_directory(copy, ImportSource(origin=str(copy)))
    notes_blob = (model_store.model_dir(corrupt.version) / "notes.json").resolve()
    notes_blob.chmod(0o644)
    notes_blob.write_text('{"release": "2026-12"}')
    nan_dir = _with_nan_scales(tiny_model_b, tmp_path / "b-nan")
    failing = model_store.import_directory(nan_dir, ImportSource(origin=str(nan_dir)))

    first = await asyncio.to_thread(_update, target, corrupt.version)
    again = await asyncio.to_thread(_update, target, corrupt.version)
    smoke = await asyncio.to_thread(_update, target, failing.version)
    retry = await asyncio.to_thread(_update, target, failing.version)

    assert first.result == admin_pb.UPDATE_RESULT_REFUSED
    assert "failed verification" in first.reason
    assert "marked bad" in again.reason or "failed verification" in again.reason
    assert smoke.result == admin_pb.UPDATE_RESULT_ROLLED_BACK, smoke.reason
    assert "non-finite" in smoke.reason
    assert retry.result == admin_pb.UPDATE_RESULT_REFUSED
    assert "marked bad" in retry.reason
    assert updater.serving.version == tiny_4bit.version
    assert model_store.refs().current == tiny_4bit.version
    assert await _greedy_all(engine) == on_a
    reopened = UpdateJournal(tmp_path / "updates.json")
    assert {corrupt.version, failing.version} <= set(reopened.bad)
    assert [o.result for o in reopened.history][:2] == ["refused", "rolled_back"]


def _with_nan_scales(model_dir: Path, out: Path) -> Path:
    """A copy of a GPTQ model whose first layer's scales are NaN: same layout, broken numbers."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    for weights in out.glob("*.safetensors"):
        tensors = load_file(weights)
        for name in tensors:
            if name.startswith("model.layers.0.") and name.endswith(".scales"):
                tensors[name] = torch.full_like(tensors[name], math.nan)
        weights.unlink()
        save_file(tensors, weights, metadata={"format": "pt"})
    return out


def _update(target: str, version: str) -> admin_pb.UpdateOutcome:
    with grpc.insecure_channel(target) as channel:
        stub = admin_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        outcome: admin_pb.UpdateOutcome = stub.Update(admin_pb.UpdateRequest(version=version))
        return outcome


async def _stream_until(target: str, stop: asyncio.Event, load: Load, client: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        while not stop.is_set():
            request = build_request(
                PROMPTS[client % len(PROMPTS)],
                params=Parameters(max_tokens=24, temperature=0.7, seed=client),
            )
            last = time.perf_counter()
            try:
                async for message in stub.GenerateStream(request):
                    now = time.perf_counter()
                    load.longest_gap_s = max(load.longest_gap_s, now - last)
                    last = now
                    load.versions.add(message.model_version)
                load.completed += 1
            except grpc.aio.AioRpcError as error:
                load.failures.append(f"{error.code().name}: {error.details()}")


async def _greedy_all(engine: Engine) -> list[str]:
    outputs = []
    for prompt in PROMPTS:
        pieces = []
        async for delta in engine.stream(engine.encode(prompt), GREEDY, f"greedy-{time.time()}"):
            pieces.append(delta.text)
        outputs.append("".join(pieces))
    return outputs


async def test_a_drop_is_taken_only_once_it_is_ready(
    admin_target: Target, model_store: ModelStore, tiny_model_b: Path,
    tiny_4bit: Manifest, tiny_4bit_b: Manifest, tmp_path: Path,
) -> None:  # fmt: skip
    """1. Files of version B are copied into the drop directory: nothing happens.
    2. READY appears: B is imported, updated to, and the drop filed under done/."""
    updater = admin_target.updater
    drop = tmp_path / "drop"
    await asyncio.to_thread(drop.mkdir)

    async with _watching(drop, model_store, updater):
        incoming = drop / "release-b"
        await asyncio.to_thread(incoming.mkdir)
        for path in await asyncio.to_thread(lambda: sorted(tiny_model_b.iterdir())):
            await asyncio.to_thread(shutil.copyfile, path, incoming / path.name)
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert updater.serving.version == tiny_4bit.version
        assert list(updater.journal.history) == []

        await asyncio.to_thread((incoming / "READY").touch)
        await _until_filed(drop / "done" / "release-b")
    assert updater.serving.version == tiny_4bit_b.version
    assert updater.journal.history[0].result == "promoted"
    assert not (drop / "done" / "release-b" / "READY").exists()
    assert list((drop / "failed").iterdir()) == []


async def test_a_drop_left_while_the_daemon_was_down_is_taken_at_start(
    admin_target: Target, model_store: ModelStore, tiny_model_b: Path,
    tiny_4bit_b: Manifest, tmp_path: Path,
) -> None:  # fmt: skip
    updater = admin_target.updater
    drop = tmp_path / "drop"
    await asyncio.to_thread(shutil.copytree, tiny_model_b, drop / "while-down")
    await asyncio.to_thread((drop / "while-down" / "READY").touch)

    async with _watching(drop, model_store, updater):
        await _until_filed(drop / "done" / "while-down")
    assert updater.serving.version == tiny_4bit_b.version


@contextlib.asynccontextmanager
async def _watching(drop: Path, store: ModelStore, updater: Updater) -> AsyncIterator[None]:
    """The drop directory watched as the daemon watches it, handing drops to `take_drop`."""

    async def ready(candidate: Path) -> None:
        await take_drop(candidate, drop, store, updater)

    watcher = DropDirectory(drop, ready, asyncio.get_running_loop())
    watcher.start()
    try:
        yield
    finally:
        watcher.stop()


async def _until_filed(where: Path, within_s: float = 30.0) -> None:
    for _ in range(int(within_s / 0.1)):
        if await asyncio.to_thread(where.is_dir):
            return
        await asyncio.sleep(0.1)


async def test_a_new_hub_commit_is_fetched_and_updated_to(
    admin_target: Target, model_store: ModelStore, tiny_model: Path,
    tiny_model_b: Path, tiny_4bit: Manifest, tiny_4bit_b: Manifest,
) -> None:  # fmt: skip
    """The loopback hub's main moves from A's files to B's: the next poll fetches B and
    promotes it; polls before and after change nothing."""
    updater = admin_target.updater
    with HubServer() as hub:
        repo = hub.add_repo("edge/tiny")
        repo.commit(tiny_model)
        fetcher = HubFetcher(model_store, endpoint=hub.endpoint)
        poller = HubPoller(fetcher, HubTarget("edge/tiny"), updater, interval_s=60)
        unchanged = await poller.poll_once()
        repo.commit(tiny_model_b)
        moved = await poller.poll_once()
        again = await poller.poll_once()
        asked = [path for method, path, _ in hub.requests if path.startswith("/api/models/")]
    assert unchanged is None
    assert moved is not None
    assert (moved.result, moved.version) == ("promoted", tiny_4bit_b.version)
    assert again is None
    assert updater.serving.version == tiny_4bit_b.version
    assert poller.failures == 0
    assert len([path for path in asked if path.endswith("/revision/main")]) == 3  # one a poll


async def test_hub_poll_failures_back_off_with_jitter(
    admin_target: Target, model_store: ModelStore
) -> None:
    updater = admin_target.updater
    with socket.socket() as closed:  # a loopback port nobody listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    fetcher = HubFetcher(model_store, endpoint=endpoint)
    poller = HubPoller(fetcher, HubTarget("edge/tiny"), updater, interval_s=10, jitter=0,
                       max_backoff_s=35)  # fmt: skip
    delays = [poller.next_delay_s()]
    for _ in range(3):
        assert await poller.poll_once() is None
        delays.append(poller.next_delay_s())
    jittered = HubPoller(fetcher, HubTarget("edge/tiny"), updater, interval_s=10, jitter=0.1,
                         rng=random.Random(7))  # fmt: skip
    spread = [jittered.next_delay_s() for _ in range(50)]
    assert delays == [10, 20, 35, 35]
    assert poller.failures == 3
    assert all(9 <= d <= 11 for d in spread)
    assert len(set(spread)) == 50


async def test_another_layout_restarts_the_engine_and_a_crash_in_probation_rolls_back(
    model_store: ModelStore, tiny_4bit: Manifest, tiny_fp16: Path,
    fresh_fp16_outputs: list[str], tmp_path: Path,
) -> None:  # fmt: skip
    """1. Clients stream; update A (4-bit) → the fp16 model: the engine is restarted, no request
    fails, and it answers as a fresh engine on fp16. 2. Its engine core is killed within the
    probation window: the updater restarts on A, marks fp16 bad, and A answers as before."""
    other = model_store.import_directory(tiny_fp16, ImportSource(origin=str(tiny_fp16)))
    async with serving(model_store, tiny_4bit, VllmEngine.start, tmp_path) as target:
        on_a = await _greedy_all(target.host.engine)
        load, stop = Load(), asyncio.Event()
        clients = [asyncio.create_task(_stream_until(target.address, stop, load, i))
                   for i in range(3)]  # fmt: skip
        await asyncio.sleep(1.0)
        restarted = await asyncio.to_thread(_update, target.admin, other.version)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)
        on_other = await _greedy_all(target.host.engine)

        _kill_newest_engine_core()
        fell_back = await _until_engine_death_handled(target.updater, target.host)
        on_a_again = await _greedy_all(target.host.engine)
        retry = await asyncio.to_thread(_update, target.admin, other.version)
        async with grpc.aio.insecure_channel(target.admin) as channel:
            status = await admin_grpc.AdminServiceStub(channel).GetStatus(
                admin_pb.GetStatusRequest()
            )
        target.host.shutdown()

    assert restarted.result == admin_pb.UPDATE_RESULT_PROMOTED, restarted.reason
    assert restarted.method == "restart"
    assert load.failures == []
    assert load.versions == {tiny_4bit.version, other.version}
    assert on_other == fresh_fp16_outputs
    assert fell_back.kind == "auto_rollback"
    assert (fell_back.result, fell_back.version) == ("promoted", tiny_4bit.version)
    assert "engine died" in fell_back.reason
    assert on_a_again == on_a
    assert "marked bad" in retry.reason
    assert model_store.refs().current == tiny_4bit.version
    assert status.version == tiny_4bit.version
    assert other.version in status.bad_versions
    assert [o.kind for o in status.history][:3] == ["update", "auto_rollback", "update"]
    print(f"\nrestart update pause {restarted.pause_s:.2f} s (restart {restarted.reload_s:.2f} s); "
          f"longest gap a client saw {load.longest_gap_s:.2f} s; {load.completed} requests, "
          f"0 failed; automatic rollback {fell_back.pause_s:.2f} s")  # fmt: skip


def _kill_newest_engine_core() -> None:
    """SIGKILL the most recently started vLLM engine core process among this process's
    children (the session engine's is older)."""
    cores = []
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in children.read_text().split():
            if Path(f"/proc/{pid}/comm").read_text().startswith("VLLM::EngineCor"):
                started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
                cores.append((started, int(pid)))
    assert cores, "no engine core process found"
    os.kill(max(cores)[1], signal.SIGKILL)


async def _until_engine_death_handled(updater: Updater, host: EngineHost) -> UpdateOutcome:
    """What the daemon's health check does: notice the dead engine, hand it to the updater."""
    for _ in range(300):
        try:
            await host.engine.check_health()
        except EngineDeadError as died:
            outcome = await updater.engine_died(str(died))
            assert outcome is not None, "not in probation"
            return outcome
        await asyncio.sleep(0.1)
    raise AssertionError("the engine's death went unnoticed for 30 s")
