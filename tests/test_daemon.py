"""`edgeagent serve` as a real process: the CLI client, and SIGTERM with streams in flight."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from launcher import SERVE, Launched, daemon_environment, is_zombie, launch
from notify_listener import listening
from real_daemon import start_daemon
from waits import HANG_S, until, wait_until

from edgeagent.client import Client, Parameters, build_request
from edgeagent.demo.tiny import EMBEDDED_MODEL_ID
from edgeagent.store.manifest import ImportSource, Manifest
from edgeagent.store.store import ModelStore
from edgeagent.timeline import SUBSTEP_INDENT
from edgeagent.v1 import admin_pb2 as admin_pb
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.daemon
StreamCall = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateStreamResponse]
# A stream that finishes inside a drain with no practical limit (HANG_S), on any machine.
LONG_STREAM = Parameters(max_tokens=1000, temperature=0)
# A stream that outlives a 1 s grace on any machine: ~10 s at the fastest decode seen (~400
# tok/s), and it is cut at the grace, so its length costs nothing.
OUTLIVES_THE_GRACE = Parameters(max_tokens=4000, temperature=0, ignore_eos=True)


class DaemonFactory(Protocol):
    def __call__(self, grace_s: float) -> Launched: ...


@pytest.fixture
def daemon_factory(tmp_path: Path, tiny_model: Path) -> Iterator[DaemonFactory]:
    started: list[Launched] = []

    def start(grace_s: float) -> Launched:
        started.append(start_daemon(tmp_path, grace_s, served=tiny_model))
        return started[-1]

    yield start
    for daemon in started:
        daemon.kill()


def _running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}") and not is_zombie(pid)]


def _any_alive(pids: list[int]) -> bool:
    return any(os.path.exists(f"/proc/{pid}") for pid in pids)


async def _read_to_end(stream: StreamCall) -> list[pb.GenerateStreamResponse]:
    messages = []
    while (message := await stream.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


async def _health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        return int(reply.status)


async def _until_draining(daemon: Launched) -> None:
    """Until the daemon has handled a SIGTERM: its health says NOT_SERVING."""
    while await _health(daemon.target) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert daemon.process.poll() is None, f"the daemon exited; log:\n{daemon.tail()}"
        await asyncio.sleep(0.05)


async def test_sigterm_lets_streams_in_flight_finish(daemon_factory: DaemonFactory) -> None:
    """1. A daemon with a grace longer than any stream; the CLI streams an answer from it.
    2. A long stream starts; SIGTERM arrives mid-stream.
    3. Health turns NOT_SERVING and a new request is refused with UNAVAILABLE.
    4. The stream runs to its end; the daemon exits 0."""
    daemon = daemon_factory(grace_s=HANG_S)
    cli = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "edgeagent",
            "generate",
            "--chat",
            "--target",
            daemon.target,
            "--max-tokens",
            "8",
            "--seed",
            "3",
            "Hello there",
        ],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert "8 generated" in cli.stderr or "FINISH_REASON_EOS_TOKEN" in cli.stderr, cli.stderr
    status, on_app_socket = [
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "edgeagent", "status", "--target", target],
            capture_output=True, text=True, timeout=HANG_S, check=False,
        )
        for target in (daemon.admin_target, daemon.target)
    ]  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("serving   ")
    with Client(daemon.admin_target, timeout=HANG_S) as admin:
        _check_start_timeline(admin.status().start_timeline, status.stdout)
    assert on_app_socket.returncode == 3  # the admin API is not on the apps' socket
    assert "UNIMPLEMENTED" in on_app_socket.stderr

    async with grpc.aio.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        stream = stub.GenerateStream(build_request("Hello", params=LONG_STREAM))
        messages = [await stream.read() for _ in range(3)]
        daemon.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(_until_draining(daemon), HANG_S)  # hang guard
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(build_request("new work", params=Parameters(max_tokens=4)))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (refused.value.details() or "")
        messages += await _read_to_end(stream)
    assert messages[-1].finish_reason in (pb.FINISH_REASON_MAX_TOKENS, pb.FINISH_REASON_EOS_TOKEN)
    assert await asyncio.to_thread(daemon.wait, HANG_S) == 0


def _check_start_timeline(rows: Sequence[admin_pb.StartPhase], shown: str) -> None:
    """The start's phases sum to the time since the process started; the engine's steps, from
    the daemon, the engine core and its worker, sum to the engine's phase, in the order of a
    start; `edgeagent status` shows them under it."""
    phases: list[tuple[str, float, list[tuple[str, float]]]] = []
    for row in rows:
        if row.name.startswith(SUBSTEP_INDENT):
            phases[-1][2].append((row.name.strip(), row.seconds))
        else:
            phases.append((row.name, row.seconds, []))
    total = sum(seconds for _, seconds, _ in phases)
    assert f"started in {total:.1f} s:" in shown
    engine = [p for p in phases if p[0].startswith("engine start")]
    assert len(engine) == 1, rows
    _, engine_s, steps = engine[0]
    assert sum(seconds for _, seconds in steps) == pytest.approx(engine_s, abs=0.1)
    assert all(seconds >= 0 for _, seconds in steps)
    names = [name for name, _ in steps]
    # The worker is spawned (its own imports) or, once its environment is recorded in the cache
    # directory, forked from the server that imported beside the daemon (worker_forkserver.py).
    worker_started = next(name for name in names if name.startswith("starting the worker"))
    forked = worker_started.startswith("starting the worker process (forked:")
    order = [
        "daemon: imports (vLLM, torch)", worker_started,
        "worker: set up" if forked else "worker: interpreter, imports (vLLM, torch)",
        "worker: model built, weights read",
        "worker: torch.compile and warm-up run (Dynamo, Inductor cache)",
        "engine core: KV cache allocated, warm-up done", "daemon: engine core ready, AsyncLLM up",
    ]  # fmt: skip
    assert [name for name in names if name in order] == order, names
    assert any(name.startswith("engine core:") for name in names[: names.index(order[1])])
    assert "    " + f"{steps[0][1]:7.2f} s  {steps[0][0]}" in shown


async def test_streams_past_the_grace_are_cancelled_with_a_reason(
    daemon_factory: DaemonFactory,
) -> None:
    """A 1 s grace: the long stream is cancelled in the engine and told why; exit 0."""
    daemon = daemon_factory(grace_s=1)
    async with grpc.aio.insecure_channel(daemon.target) as channel:
        stream = pb_grpc.GenerationServiceStub(channel).GenerateStream(
            build_request("Hello", params=OUTLIVES_THE_GRACE)
        )
        await stream.read()
        daemon.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as cancelled:
            await _read_to_end(stream)
    assert cancelled.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "1 s drain grace period" in (cancelled.value.details() or "")
    assert await asyncio.to_thread(daemon.wait, HANG_S) == 0


async def test_second_signal_forces_exit(daemon_factory: DaemonFactory) -> None:
    """SIGTERM starts a drain the stream would outlast; a second SIGTERM exits at once (exit
    130, not the drained exit 0), engine processes included."""
    daemon = daemon_factory(grace_s=HANG_S)
    engine_processes = daemon.children()
    assert engine_processes
    async with grpc.aio.insecure_channel(daemon.target) as channel:
        stream = pb_grpc.GenerationServiceStub(channel).GenerateStream(
            build_request("Hello", params=OUTLIVES_THE_GRACE)
        )
        await stream.read()
        daemon.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(_until_draining(daemon), HANG_S)  # hang guard
        daemon.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, HANG_S) == 130
        stream.cancel()
    await until(
        f"engine processes {engine_processes} to exit after the daemon",
        lambda: not _any_alive(engine_processes),
    )


def test_empty_store_and_unreachable_hub_is_a_clear_error(tmp_path: Path) -> None:
    hub = {"EDGEAGENT_HUB__ENDPOINT": "http://127.0.0.1:9"}  # the discard port: refused
    env = daemon_environment(tmp_path, tmp_path / "state", tmp_path / "cache", hub)
    result = subprocess.run(
        SERVE,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=HANG_S,
        check=False,
    )
    assert result.returncode == 8
    assert "the store is empty: fetching kaitchup/Phi-4-AutoRound-GPTQ-4bit@main" in result.stderr
    assert "cannot serve: cannot reach the hub" in result.stderr


async def test_empty_store_builds_the_embedded_model_and_serves_it(
    tmp_path: Path, embedded_4bit: Manifest
) -> None:
    """The quick start's path: an empty store, source `embedded`. The daemon takes the trained
    tiny model (cached by the session), builds it to 4-bit GPTQ with AutoRound, commits it,
    loads it and serves it; the build is
    reproducible, so it is the very version the test session built. Under systemd's notify
    protocol (a real socket): status lines and start-up extensions while it builds and loads,
    READY=1 once it serves, a watchdog heartbeat throughout, STOPPING=1 on SIGTERM."""
    notify = str(tmp_path / "notify.sock")
    with listening(notify) as systemd:
        daemon = await asyncio.to_thread(
            start_daemon, tmp_path, 10.0, None, EDGEAGENT_MODEL__SOURCE="embedded",
            NOTIFY_SOCKET=notify, WATCHDOG_USEC="1000000",
        )  # fmt: skip
        try:
            with Client(daemon.target) as client:
                info = client.model_info()
                question = build_request(messages=[("user", "What is 7 + 5?")],
                                         params=Parameters(temperature=0))  # fmt: skip
                answer = client.generate_request(question)
            assert (info.model_id, info.version) == (EMBEDDED_MODEL_ID, embedded_4bit.version)
            assert "gptq" in info.quantization
            assert answer.text.startswith("7 + 5 = ")  # the trained model, 4-bit
            await asyncio.to_thread(systemd.wait_for, "READY=1")
        finally:
            exit_code = await asyncio.to_thread(daemon.terminate, HANG_S)
        assert exit_code == 0
    assert ModelStore(tmp_path / "state" / "models").refs().current == embedded_4bit.version
    texts, times = systemd.texts(), [at for at, _ in systemd.messages]
    ready = next(i for i, text in enumerate(texts) if text.startswith("READY=1"))
    stopping = next(i for i, text in enumerate(texts) if text.startswith("STOPPING=1"))
    assert texts[0].startswith("STATUS=preparing the model")
    assert any(t.startswith("STATUS=job='build ") and "state=done" in t for t in texts[:ready])
    assert f"STATUS=starting the engine on {embedded_4bit.version}" in texts[:ready]
    assert "EXTEND_TIMEOUT_USEC=30000000" in texts[:ready]
    assert texts[ready] == f"READY=1\nSTATUS=serving {EMBEDDED_MODEL_ID} {embedded_4bit.version}"
    assert ready < stopping
    # A heartbeat every 0.5 s (half of WATCHDOG_USEC) while it builds and loads: at least a
    # third of that rate over however long this machine took to get ready.
    starting_s = times[ready] - times[0]
    pings = texts[:ready].count("WATCHDOG=1")
    assert pings >= max(2, starting_s / 1.5), f"{pings} in {starting_s:.1f} s"
    assert texts[ready:stopping].count("WATCHDOG=1") >= 1


async def test_engine_death_stops_the_daemon_with_exit_1(daemon_factory: DaemonFactory) -> None:
    """1. A serving daemon. 2. Its engine core process is killed.
    3. The main loop's health check notices; the daemon exits 1 so systemd restarts it."""
    daemon = daemon_factory(grace_s=60)
    for pid in daemon.children():
        os.kill(pid, signal.SIGKILL)
    assert await asyncio.to_thread(daemon.wait, HANG_S) == 1


async def test_a_sigkilled_daemon_leaves_no_engine_process_behind(
    tmp_path: Path, tiny_model: Path
) -> None:
    """1. A serving daemon, outside systemd (no cgroup to clean up after it). 2. SIGKILL, as
    an OOM kill or an operator's `kill -9` does. 3. None of the processes it had started
    (vLLM's engine core and what that started) keeps running: the orphan guard in the engine
    core says it stops it. 4. A daemon started at once on the same state serves."""
    daemon = await asyncio.to_thread(start_daemon, tmp_path, 10.0, tiny_model)
    engine_processes = daemon.descendants()
    assert engine_processes, "the daemon had no engine process to leave behind"
    daemon.process.kill()
    daemon.process.wait()
    killed = time.monotonic()
    await until(
        f"the killed daemon's processes {_running(engine_processes)} to exit",
        lambda: not _running(engine_processes),
    )
    gone_after_s = time.monotonic() - killed
    killed_log = daemon.log()  # the next daemon overwrites it
    restarted = await asyncio.to_thread(start_daemon, tmp_path, 10.0, None)
    try:
        with Client(restarted.target, timeout=HANG_S) as client:
            answer = await asyncio.to_thread(
                client.generate, "Hello again", Parameters(max_tokens=4, temperature=0)
            )
    finally:
        exit_code = await asyncio.to_thread(restarted.terminate, HANG_S)
    assert "is gone; stopping this engine process" in killed_log, killed_log[-3000:]
    assert answer.completion_tokens == 4
    assert exit_code == 0
    print(f"\n{len(engine_processes)} engine processes gone {gone_after_s:.1f} s after SIGKILL")


async def test_another_layout_restarts_inside_the_daemon_and_death_in_probation_rolls_back(
    tmp_path: Path, tiny_model: Path, tiny_fp16: Path, tiny_4bit: Manifest
) -> None:
    """1. A daemon serves A (4-bit); the fp16 model, another layout, is in its store.
    2. `edgeagent update` over the admin socket: the engine is restarted on fp16 while the
    daemon's health checks go on; promoted, and it answers. 3. The engine core is killed inside
    the probation window: the health check restarts the engine on A, marks fp16 bad, and the
    daemon keeps serving. 4. SIGTERM: exit 0."""
    store = ModelStore(tmp_path / "state" / "models")
    other = store.import_directory(tiny_fp16, ImportSource(origin=str(tiny_fp16)))
    daemon = await asyncio.to_thread(start_daemon, tmp_path, 10.0, tiny_model)
    try:
        update = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "edgeagent", "update", other.version[:10],
             "--target", daemon.admin_target],
            capture_output=True, text=True, timeout=HANG_S, check=False,
        )  # fmt: skip
        assert update.returncode == 0, update.stdout + update.stderr + daemon.tail()
        with Client(daemon.target, timeout=HANG_S) as client:
            on_other = await asyncio.to_thread(
                client.generate, "Hello", Parameters(max_tokens=4, temperature=0)
            )
        os.kill(daemon.engine_core(), signal.SIGKILL)
        status = await asyncio.to_thread(_wait_for_auto_rollback, daemon)
        with Client(daemon.target, timeout=HANG_S) as client:
            answer = await asyncio.to_thread(
                client.generate, "Still here?", Parameters(max_tokens=4, temperature=0)
            )
    finally:
        exit_code = await asyncio.to_thread(daemon.terminate, HANG_S)
    assert exit_code == 0
    assert "restart" in update.stdout
    assert on_other.model_version == other.version
    assert status.version == tiny_4bit.version
    assert [o.kind for o in status.history][:2] == ["auto_rollback", "update"]
    assert "engine died" in status.bad_versions[other.version]
    assert answer.model_version == tiny_4bit.version
    assert store.refs().current == tiny_4bit.version


def _wait_for_auto_rollback(daemon: Launched) -> admin_pb.Status:
    def rolled_back() -> admin_pb.Status | None:
        assert daemon.process.poll() is None, f"the daemon exited; log:\n{daemon.tail()}"
        with contextlib.suppress(grpc.RpcError):  # busy restarting: asked again
            status = admin.status()
            if status.history and status.history[0].kind == "auto_rollback":
                return status
        return None

    with Client(daemon.admin_target, timeout=HANG_S) as admin:
        return wait_until("an automatic rollback", rolled_back, every_s=0.5)


async def test_a_failed_restart_leaves_the_old_version_answering(
    tmp_path: Path, tiny_model: Path, tiny_fp16: Path, tiny_4bit: Manifest
) -> None:
    """Regression (issue 12): an update to another layout whose new engine fails its smoke test
    (NaN weights) restarts the engine on the old version, and the requests after it are
    answered by the old version. They used to fail: the generation service kept the engine the
    restart had shut down, while health said SERVING."""
    store = ModelStore(tmp_path / "state" / "models")
    nan_dir = _with_nan_weights(tiny_fp16, tmp_path / "fp16-nan")
    broken = store.import_directory(nan_dir, ImportSource(origin=str(nan_dir)))
    daemon = await asyncio.to_thread(start_daemon, tmp_path, 10.0, tiny_model)
    try:
        update = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "edgeagent", "update", broken.version,
             "--target", daemon.admin_target],
            capture_output=True, text=True, timeout=HANG_S, check=False,
        )  # fmt: skip
        with Client(daemon.target, timeout=HANG_S) as client:
            answer = await asyncio.to_thread(
                client.generate, "Still there?", Parameters(max_tokens=4, temperature=0)
            )
        health = await _health(daemon.target)
    finally:
        exit_code = await asyncio.to_thread(daemon.terminate, HANG_S)
    assert exit_code == 0
    assert update.returncode == 11, update.stdout + update.stderr
    assert "rolled_back" in update.stdout
    assert "non-finite" in update.stdout or "smoke test" in update.stdout
    assert (answer.model_version, answer.completion_tokens) == (tiny_4bit.version, 4)
    assert health == health_pb2.HealthCheckResponse.SERVING


def _with_nan_weights(model_dir: Path, out: Path) -> Path:
    """A copy of an fp16 model whose first layer's weights are NaN: it loads, its output is not
    finite."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    for weights in out.glob("*.safetensors"):
        tensors = load_file(weights)
        for name in tensors:
            if name.startswith("model.layers.0."):
                tensors[name] = torch.full_like(tensors[name], math.nan)
        weights.unlink()
        save_file(tensors, weights, metadata={"format": "pt"})
    return out


def test_a_model_that_does_not_fit_is_not_loaded(tmp_path: Path, tiny_model: Path) -> None:
    """A memory budget below what the fit check predicts: exit 10 before vLLM starts."""
    store = ModelStore(tmp_path / "state" / "models")
    store.activate(store.import_directory(tiny_model, ImportSource(origin="tiny")).version)
    budget = {"EDGEAGENT_MEMORY__BUDGET_GIB": "0.5"}
    env = daemon_environment(tmp_path, tmp_path / "state", tmp_path / "cache", budget)
    result = subprocess.run(
        SERVE, env={**os.environ, **env}, capture_output=True, text=True, timeout=HANG_S,
        check=False,
    )  # fmt: skip
    assert result.returncode == 10
    assert "does not fit: the model needs" in result.stderr
    assert "a budget of 0.50 GiB" in result.stderr
    assert "Initializing a V1 LLM engine" not in result.stderr


def test_sigterm_while_building_stops_the_build_and_exits_cleanly(
    tmp_path: Path, trained_fp16: Path
) -> None:
    """An empty store, source `embedded`, the trained model cached: SIGTERM arrives while
    AutoRound runs. The daemon stops the quantizer, exits 0, and leaves the store without a
    version."""
    daemon = launch(tmp_path, tmp_path / "state", trained_fp16.parent.parent,
                    {"EDGEAGENT_MODEL__SOURCE": "embedded"})  # fmt: skip
    quantizer = _wait_for_grandchild(daemon.process.pid)
    assert daemon.terminate(HANG_S) == 0, daemon.log()[-3000:]
    assert not os.path.exists(f"/proc/{quantizer}") or is_zombie(quantizer)
    store = ModelStore(tmp_path / "state" / "models")
    assert store.manifests() == []
    assert "stopped while preparing the model" in daemon.log()


def _wait_for_grandchild(pid: int) -> int:
    """The build worker: a child of the daemon running edgeagent.sources.build_worker."""

    def worker() -> int | None:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                if b"build_worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
        return None

    return wait_until("the daemon's build worker", worker, every_s=0.1)
