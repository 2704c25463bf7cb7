"""Hot swaps on the real vLLM engine through the admin API, with clients streaming the whole
time: what only the real engine can show (the weights really change, nothing computed by the old
ones survives, a broken candidate's NaNs do not poison the old version, a real engine core
killed in probation). The update state machine's every branch is in tests/fast.

The session's real engine serves version A (the embedded 4-bit build); version B has the same
layout and other weights. A separate gRPC server with the admin service runs on that engine.
Updates to another layout (the fp16 tiny model) restart the engine: that test runs its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from conftest import CACHE, TEST_CONTEXT, api_server, wait_until_engine_idle
from waits import HANG_S, until

from edgeagent.client import Parameters, build_request
from edgeagent.engine.interface import Engine, EngineConfig, EngineFactory, SamplingOptions
from edgeagent.engine.loader import EngineLoader
from edgeagent.engine.slot import Serving, ServingSlot
from edgeagent.engine.vllm_engine import VllmEngine
from edgeagent.errors import EngineDeadError, EngineError
from edgeagent.eval_set import held_out_set
from edgeagent.gpu import SystemMemoryProbe
from edgeagent.server.admin import AdminService
from edgeagent.settings import ModelSettings, Settings
from edgeagent.store.manifest import ImportSource, Manifest
from edgeagent.store.store import ModelStore
from edgeagent.updates.gate import QualityGate
from edgeagent.updates.journal import UpdateJournal, UpdateOutcome
from edgeagent.updates.pipeline import Updater
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
    """An admin-enabled gRPC server over an updater and the slot it updates."""

    address: str  # generation
    admin: str  # the admin service's own socket
    updater: Updater
    slot: ServingSlot
    journal_path: Path

    @property
    def engine(self) -> Engine:
        return self.slot.current().engine


@contextlib.asynccontextmanager
async def serving(
    store: ModelStore, version: Manifest, factory: EngineFactory, tmp_path: Path,
    gate: QualityGate | None = None,
) -> AsyncIterator[Target]:  # fmt: skip
    """The daemon's wiring around one slot: loader, updater, journal, gRPC and admin servers;
    `version` loaded through the loader as at start-up."""
    store.activate(version.version)
    settings = Settings(
        state_dir=tmp_path / "state",
        cache_dir=CACHE,  # shares the tests' compile cache, keyed on the served model's path
        model=ModelSettings(max_model_len=TEST_CONTEXT, kv_cache_gib=0.0625, max_num_seqs=4),
    )
    loader = EngineLoader(settings, store, factory, SystemMemoryProbe())
    slot = ServingSlot()
    await slot.swap(lambda _: loader.start(version, loader.plan(version)), hold_s=0)
    journal_path = tmp_path / "updates.json"
    updater = Updater(store, loader, slot, UpdateJournal(journal_path), hold_s=30,
                      probation_s=120, gate=gate)  # fmt: skip
    app_socket, admin_socket = tmp_path / "app.sock", tmp_path / "admin.sock"
    server = api_server(slot, app_socket, admin=AdminService(slot, updater),
                        admin_socket_path=admin_socket)  # fmt: skip
    await server.start()
    try:
        yield Target(f"unix:{app_socket}", f"unix:{admin_socket}", updater, slot, journal_path)
    finally:
        await server.stop(grace=None)


async def _release(slot: ServingSlot) -> None:
    """Shut down the engine `slot` serves (one the test started)."""

    async def stop(serving: Serving | None) -> None:
        if serving is not None:
            await asyncio.to_thread(serving.engine.shutdown)

    await slot.swap(stop, hold_s=None)


@pytest.fixture
async def admin_target(
    engine: VllmEngine, model_store: ModelStore, tiny_4bit: Manifest, tmp_path: Path
) -> AsyncIterator[Target]:
    """The session's engine behind an updater: reloads only, never a restart."""
    async with serving(model_store, tiny_4bit, lambda config: engine, tmp_path) as target:
        yield target
        if target.slot.current().version != tiny_4bit.version:  # leave the engine on A
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
        await until("the clients' first 4 replies", lambda: load.completed >= 4)
        to_b = await admin.Update(admin_pb.UpdateRequest(version=tiny_4bit_b.version[:8]))
        await until("a client served by B", lambda: tiny_4bit_b.version in load.versions)
        on_b = await _greedy_all(engine)
        back = await admin.Rollback(admin_pb.RollbackRequest())
        rolled_back_at = load.completed
        await until("4 replies after the rollback", lambda: load.completed >= rolled_back_at + 4)
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
    assert {o.method for o in status.history} == {"copy"}
    print(f"\nupdate pause {to_b.pause_s:.3f} s (copy {to_b.reload_s:.3f} s), rollback pause "
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
    assert updater.serving_version == tiny_4bit.version
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


async def test_staged_weights_change_nothing_that_serves_until_copied_in(
    engine: VllmEngine, tiny_4bit: Manifest, tiny_4bit_b: Manifest, tiny_model_b: Path,
    tiny_fp16: Path, fresh_b_outputs: list[str],
) -> None:  # fmt: skip
    """The one-copy swap's parts on the real engine: B staged beside the serving A changes no
    answer; a checkpoint of another layout cannot be staged and changes nothing either; B
    copied in answers as a fresh engine on B; A's staged copy puts A back exactly."""
    a, b = tiny_4bit.version, tiny_4bit_b.version
    on_a = await _greedy_all(engine)
    await engine.stage_weights(b, tiny_model_b)
    assert await _greedy_all(engine) == on_a
    with pytest.raises(EngineError, match="staging fp16 failed"):
        await engine.stage_weights("fp16", tiny_fp16)
    assert await _greedy_all(engine) == on_a
    await engine.stage_weights(a, None)
    staged = await engine.keep_staged([a, b])
    assert set(staged) == {a, b}
    assert staged[a] == staged[b] > 0
    try:
        await engine.swap_in_staged(b)
        on_b = await _greedy_all(engine)
    finally:
        await engine.swap_in_staged(a)
    assert on_b == fresh_b_outputs
    assert await _greedy_all(engine) == on_a
    assert await engine.keep_staged([]) == {}


async def _greedy_all(engine: Engine) -> list[str]:
    outputs = []
    for prompt in PROMPTS:
        pieces = []
        async for delta in engine.stream(engine.encode(prompt), GREEDY, f"greedy-{time.time()}"):
            pieces.append(delta.text)
        outputs.append("".join(pieces))
    return outputs


async def test_another_layout_restarts_the_engine_and_a_crash_in_probation_rolls_back(
    model_store: ModelStore, tiny_4bit: Manifest, tiny_fp16: Path,
    fresh_fp16_outputs: list[str], tmp_path: Path,
) -> None:  # fmt: skip
    """1. Clients stream; update A (4-bit) → the fp16 model: the engine is restarted, no request
    fails, and it answers as a fresh engine on fp16. 2. Its engine core is killed within the
    probation window: the updater restarts on A, marks fp16 bad, and A answers as before."""
    other = model_store.import_directory(tiny_fp16, ImportSource(origin=str(tiny_fp16)))
    async with serving(model_store, tiny_4bit, VllmEngine.start, tmp_path) as target:
        on_a = await _greedy_all(target.engine)
        load, stop = Load(), asyncio.Event()
        clients = [asyncio.create_task(_stream_until(target.address, stop, load, i))
                   for i in range(3)]  # fmt: skip
        await until("the clients' first 3 replies", lambda: load.completed >= 3)
        engine_a = target.engine
        assert isinstance(engine_a, VllmEngine)
        replaced = weakref.ref(engine_a._llm)  # the vLLM AsyncLLM that A's engine wraps
        del engine_a
        restarted = await asyncio.to_thread(_update, target.admin, other.version)
        await until("a client served by fp16", lambda: other.version in load.versions)
        stop.set()
        await asyncio.gather(*clients)
        on_other = await _greedy_all(target.engine)

        _kill_newest_engine_core()
        fell_back = await _until_engine_death_handled(target.updater, target.slot)
        on_a_again = await _greedy_all(target.engine)
        retry = await asyncio.to_thread(_update, target.admin, other.version)
        async with grpc.aio.insecure_channel(target.admin) as channel:
            status = await admin_grpc.AdminServiceStub(channel).GetStatus(
                admin_pb.GetStatusRequest()
            )
        await _release(target.slot)

    assert restarted.result == admin_pb.UPDATE_RESULT_PROMOTED, restarted.reason
    assert restarted.method == "restart"
    assert replaced() is None  # nothing keeps a replaced engine's front end past its stop
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


async def _until_engine_death_handled(updater: Updater, slot: ServingSlot) -> UpdateOutcome:
    """What the daemon's health check does: notice the dead engine, hand it to the updater."""
    async with asyncio.timeout(HANG_S):  # hang guard
        while True:
            try:
                await slot.current().engine.check_health()
            except EngineDeadError as died:
                outcome = await updater.engine_died(str(died))
                assert outcome is not None, "not in probation"
                return outcome
            await asyncio.sleep(0.1)


async def test_the_quality_gate_promotes_a_close_candidate_and_refuses_bad_ones_under_load(
    model_store: ModelStore, trained_fp16: Path, tiny_fp16: Path, tmp_path: Path
) -> None:
    """The trained embedded model (fp16) serves, behind the quality gate, with clients streaming
    the whole time. 1. The same weights with slight noise: promoted. 2. Noise as large as the
    weights' own spread (finite: the smoke test passes): refused with its figures, marked bad.
    3. Another model (the random-weight tiny model, same shape): refused. No request failed."""
    serving_version = _imported(model_store, trained_fp16)
    close = _imported(model_store, _with_noise(trained_fp16, tmp_path / "close", 0.002))
    noisy = _imported(model_store, _with_noise(trained_fp16, tmp_path / "noisy", 1.0))
    other = _imported(model_store, tiny_fp16)
    # Imported from a directory, it is not known as the embedded model: its held-out set is named.
    gate = QualityGate(max_perplexity_ratio=1.2, min_top1_agreement=0.9, eval_set=held_out_set())
    async with serving(model_store, serving_version, VllmEngine.start, tmp_path, gate) as target:
        try:
            load, stop = Load(), asyncio.Event()
            clients = [asyncio.create_task(_stream_until(target.address, stop, load, i))
                       for i in range(2)]  # fmt: skip
            await until("the clients' first 2 replies", lambda: load.completed >= 2)
            outcomes = [await asyncio.to_thread(_update, target.admin, candidate.version)
                        for candidate in (close, noisy, other)]  # fmt: skip
            stop.set()
            await asyncio.gather(*clients)
            served, bad = target.updater.serving_version, set(target.updater.journal.bad)
        finally:
            await _release(target.slot)
    promoted, refused_noisy, refused_other = outcomes
    assert promoted.result == admin_pb.UPDATE_RESULT_PROMOTED, promoted.reason
    for outcome in (refused_noisy, refused_other):
        assert outcome.result == admin_pb.UPDATE_RESULT_ROLLED_BACK, outcome.reason
        assert "quality gate" in outcome.reason
    assert "perplexity" in refused_noisy.reason
    assert "top-1 agreement" in refused_noisy.reason
    assert served == close.version
    assert {noisy.version, other.version} <= bad
    assert load.failures == []
    assert load.completed >= 3
    print(f"\ngate: promoted {close.version} (pause {promoted.pause_s:.2f} s); "
          f"{refused_noisy.reason}; {refused_other.reason}")  # fmt: skip


def _imported(store: ModelStore, model_dir: Path) -> Manifest:
    return store.import_directory(model_dir, ImportSource(origin=str(model_dir)))


def _with_noise(model_dir: Path, out: Path, scale: float) -> Path:
    """A copy whose every weight matrix has Gaussian noise of `scale` times its own standard
    deviation added (a fixed seed): finite, same layout, as close or far as `scale` says."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    generator = torch.Generator().manual_seed(7)
    for weights in out.glob("*.safetensors"):
        tensors = load_file(weights)
        for name, tensor in tensors.items():
            if tensor.dim() == 2:
                noise = torch.randn(tensor.shape, generator=generator) * tensor.float().std()
                tensors[name] = (tensor.float() + scale * noise).to(tensor.dtype)
        weights.unlink()
        save_file(tensors, weights, metadata={"format": "pt"})
    return out
