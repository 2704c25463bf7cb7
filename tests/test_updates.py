"""Hot swaps through the admin API, with clients streaming the whole time.

The session's real engine serves version A (the embedded 4-bit build); version B has the same
layout and other weights. A separate gRPC server with the admin service runs on that engine.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from conftest import TEST_CONTEXT, TEST_LIMITS, wait_until_engine_idle

from edgeagent.artifacts.manifest import ImportSource, Manifest
from edgeagent.artifacts.store import ModelStore
from edgeagent.client import Parameters, build_request
from edgeagent.engine import EngineConfig, SamplingOptions, VllmEngine
from edgeagent.server.admin import AdminService
from edgeagent.server.app import ApiServer
from edgeagent.server.inflight import InflightRequests
from edgeagent.server.service import GenerationService, ServedModel
from edgeagent.settings import ServerSettings
from edgeagent.updates.pipeline import Updater
from edgeagent.updates.sources import DropDirectory, take_drop
from edgeagent.v1 import admin_pb2 as admin_pb
from edgeagent.v1 import admin_pb2_grpc as admin_grpc
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

PROMPTS = ("The library opens", "Seven bridges cross")
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
    config = EngineConfig(tiny_model_b, kv_cache_bytes=64 << 20, max_num_seqs=2,
                          max_model_len=TEST_CONTEXT)  # fmt: skip
    engine = VllmEngine.start(config)
    try:
        return asyncio.run(_greedy_all(engine))
    finally:
        engine.shutdown()


@pytest.fixture
async def admin_target(
    engine: VllmEngine, model_store: ModelStore, tiny_4bit: Manifest, tiny_4bit_b: Manifest,
    tmp_path: Path,
) -> AsyncIterator[tuple[str, Updater]]:  # fmt: skip
    model_store.activate(tiny_4bit.version)
    inflight = InflightRequests()
    served = ServedModel(tiny_4bit.model_id, tiny_4bit.version)
    service = GenerationService(engine, served, TEST_LIMITS, inflight)

    def promoted(manifest: Manifest) -> None:
        service.served = ServedModel(manifest.model_id, manifest.version)

    updater = Updater(model_store, engine, inflight, tiny_4bit, on_promoted=promoted, hold_s=30)
    socket_path = tmp_path / "admin.sock"
    server = ApiServer(service, ServerSettings(), socket_path, admin=AdminService(updater))
    await server.start()
    await server.set_serving(True)
    try:
        yield f"unix:{socket_path}", updater
    finally:
        await server.stop(grace=None)
        if updater.serving.version != tiny_4bit.version:  # leave the session engine on A
            await engine.reload_weights(model_store.model_dir(tiny_4bit.version))
        await wait_until_engine_idle(engine)


async def test_updates_under_load_fail_no_request_and_serve_the_new_weights(
    admin_target: tuple[str, Updater], engine: VllmEngine, tiny_4bit: Manifest,
    tiny_4bit_b: Manifest, fresh_b_outputs: list[str],
) -> None:  # fmt: skip
    """1. Four clients stream continuously. 2. Update A → B: promoted; the engine now answers
    exactly as a fresh engine on B. 3. Roll back to A: promoted; A's answers again.
    4. No request failed; replies name the version that produced them."""
    target, _ = admin_target
    on_a = await _greedy_all(engine)
    load, stop = Load(), asyncio.Event()
    clients = [asyncio.create_task(_stream_until(target, stop, load, i)) for i in range(4)]
    async with grpc.aio.insecure_channel(target) as channel:
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
    print(f"\nupdate pause {to_b.pause_s:.3f} s (reload {to_b.reload_s:.3f} s), rollback pause "
          f"{back.pause_s:.3f} s; longest gap a client saw {load.longest_gap_s:.3f} s; "
          f"{load.completed} requests, 0 failed")  # fmt: skip


async def test_corrupt_or_other_layout_candidates_are_refused(
    admin_target: tuple[str, Updater], model_store: ModelStore, tiny_model_b: Path,
    tiny_fp16: Path, tiny_4bit: Manifest, tmp_path: Path,
) -> None:  # fmt: skip
    target, updater = admin_target
    copy = tmp_path / "b-with-notes"
    shutil.copytree(tiny_model_b, copy)
    (copy / "notes.json").write_text('{"release": "2026-11"}')
    corrupt = model_store.import_directory(copy, ImportSource(origin=str(copy)))
    notes_blob = (model_store.model_dir(corrupt.version) / "notes.json").resolve()
    notes_blob.chmod(0o644)
    notes_blob.write_text('{"release": "2026-12"}')
    other_layout = model_store.import_directory(tiny_fp16, ImportSource(origin="fp16"))

    first = await asyncio.to_thread(_update, target, corrupt.version)
    again = await asyncio.to_thread(_update, target, corrupt.version)
    layout = await asyncio.to_thread(_update, target, other_layout.version)

    assert first.result == admin_pb.UPDATE_RESULT_REFUSED
    assert "failed verification" in first.reason
    assert "marked bad" in again.reason or "failed verification" in again.reason
    assert layout.result == admin_pb.UPDATE_RESULT_REFUSED
    assert "another architecture or quantization layout" in layout.reason
    assert updater.serving.version == tiny_4bit.version
    assert model_store.refs().current == tiny_4bit.version


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
                PROMPTS[client % 2], params=Parameters(max_tokens=24, temperature=0.7, seed=client)
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


async def _greedy_all(engine: VllmEngine) -> list[str]:
    outputs = []
    for prompt in PROMPTS:
        pieces = []
        async for delta in engine.stream(engine.encode(prompt), GREEDY, f"greedy-{time.time()}"):
            pieces.append(delta.text)
        outputs.append("".join(pieces))
    return outputs


async def test_a_drop_is_taken_only_once_it_is_ready(
    admin_target: tuple[str, Updater], model_store: ModelStore, tiny_model_b: Path,
    tiny_4bit: Manifest, tiny_4bit_b: Manifest, tmp_path: Path,
) -> None:  # fmt: skip
    """1. Files of version B are copied into the drop directory: nothing happens.
    2. READY appears: B is imported, updated to, and the drop filed under done/."""
    _, updater = admin_target
    drop = tmp_path / "drop"
    await asyncio.to_thread(drop.mkdir)

    async def ready(candidate: Path) -> None:
        await take_drop(candidate, drop, model_store, updater)

    watcher = DropDirectory(drop, ready, asyncio.get_running_loop())
    watcher.start()
    try:
        incoming = drop / "release-b"
        await asyncio.to_thread(incoming.mkdir)
        for path in await asyncio.to_thread(lambda: sorted(tiny_model_b.iterdir())):
            await asyncio.to_thread(shutil.copyfile, path, incoming / path.name)
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert updater.serving.version == tiny_4bit.version
        assert list(updater.history) == []

        await asyncio.to_thread((incoming / "READY").touch)
        for _ in range(300):
            if await asyncio.to_thread((drop / "done" / "release-b").is_dir):
                break
            await asyncio.sleep(0.1)
    finally:
        watcher.stop()
    assert updater.serving.version == tiny_4bit_b.version
    assert updater.history[0].result == "promoted"
    assert not (drop / "done" / "release-b" / "READY").exists()
    assert list((drop / "failed").iterdir()) == []
