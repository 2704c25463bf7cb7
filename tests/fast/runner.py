"""The real daemon with fake engines: in this process (for speed) or as a child process (to be
killed; started by the launcher both tiers share, `tests/launcher.py`). Either runs on a `Box`:
a state directory whose store holds fake versions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from launcher import Launched, daemon_environment, launch, socket_target
from waits import HANG_S, until

from edgeagent.client import Parameters, build_request
from edgeagent.daemon import Daemon
from edgeagent.engine.loader import EngineLoader
from edgeagent.engine.slot import ServingSlot
from edgeagent.settings import Settings
from edgeagent.store.compile_key import BoxFacts
from edgeagent.store.manifest import ImportSource, Manifest
from edgeagent.store.store import ModelStore
from edgeagent.updates.journal import UpdateJournal
from edgeagent.updates.pipeline import Updater
from edgeagent.v1 import admin_pb2 as admin_pb
from edgeagent.v1 import admin_pb2_grpc as admin_grpc
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc
from fast.fakes import Behaviour, FakeEngines, FakeProbe, make_fake_model

TESTS = Path(__file__).resolve().parent.parent
PROMPT = "Tell me about edge boxes"
COMPILE_CACHE_VARIABLES = ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR")  # the daemon sets them
BOX_SETTINGS = {  # what every box's daemon gets, in this process or a child
    "EDGEAGENT_UPDATES__HUB_POLL_INTERVAL_S": "0",
    "EDGEAGENT_UPDATES__HOLD_S": "5",
    "EDGEAGENT_SERVER__DRAIN_GRACE_S": "5",
    # The fake GPU always has room for two engines, where "auto" swaps beside; most tests are
    # about the in-place paths (test_swap_beside.py is about the other).
    "EDGEAGENT_UPDATES__SWAP": "in_place",
}


@dataclass
class Box:
    """One edge box's state directory. `add` commits a fake version to its store."""

    root: Path
    versions: dict[str, Manifest] = field(default_factory=dict)

    @property
    def store(self) -> ModelStore:
        return ModelStore(self.root / "state" / "models")

    @property
    def journal(self) -> UpdateJournal:
        return UpdateJournal(self.root / "state" / "updates.json")

    @property
    def drop(self) -> Path:
        return self.root / "state" / "drop"

    def add(
        self, name: str, behaviour: Behaviour | None = None, *, current: bool = False,
        **model: Any,
    ) -> Manifest:  # fmt: skip
        source = make_fake_model(self.root / "sources" / name, behaviour or Behaviour(), **model)
        manifest = self.store.import_directory(source, ImportSource(origin=str(source)))
        self.versions[name] = manifest
        if current:
            self.store.activate(manifest.version)
        return manifest

    def environment(self, **settings: str) -> dict[str, str]:
        """The daemon's settings as `EDGEAGENT_*` variables (what a child process gets)."""
        return daemon_environment(self.root, self.root / "state", self.root / "cache",
                                  {**BOX_SETTINGS, **settings})  # fmt: skip

    def settings(self, **settings: str) -> Settings:
        """The same settings for a daemon in this process."""
        saved = dict(os.environ)
        try:
            os.environ.update(self.environment(**settings))
            return Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    @property
    def target(self) -> str:
        return socket_target(self.root, "edgeagent.sock")

    @property
    def admin_target(self) -> str:
        return socket_target(self.root, "admin.sock")

    async def until_filed(self, name: str) -> Path:
        """The drop `name` once the daemon has filed it under done/ or failed/."""
        return await until(
            f"drop {name} filed",
            lambda: next((self.drop / o / name for o in ("done", "failed")
                          if (self.drop / o / name).exists()), None),
        )  # fmt: skip


async def slot_and_updater(box: Box, name: str = "a") -> tuple[ServingSlot, Updater]:
    """The daemon's serving core on `box` without its servers: the version `name` loaded into a
    slot as at start-up, and the updater over it (for tests that assemble servers themselves)."""
    store, manifest = box.store, box.versions[name]
    loader = EngineLoader(box.settings(), store, FakeEngines(), FakeProbe())
    slot = ServingSlot()
    await slot.swap(lambda _: loader.start(manifest, loader.plan(manifest)), hold_s=0)
    return slot, Updater(store, loader, slot, box.journal)


class Calls:
    """gRPC calls to a daemon on a box, as apps and operators make them."""

    def __init__(self, box: Box) -> None:
        self.box = box

    async def generate(self, prompt: str = PROMPT, max_tokens: int = 6) -> pb.GenerateResponse:
        async with grpc.aio.insecure_channel(self.box.target) as channel:
            request = build_request(prompt, params=Parameters(max_tokens=max_tokens, temperature=0))
            reply: pb.GenerateResponse = await pb_grpc.GenerationServiceStub(channel).Generate(
                request, timeout=30
            )
            return reply

    async def health(self) -> int:
        async with grpc.aio.insecure_channel(self.box.target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            return int(reply.status)

    async def status(self) -> admin_pb.Status:
        async with grpc.aio.insecure_channel(self.box.admin_target) as channel:
            status: admin_pb.Status = await admin_grpc.AdminServiceStub(channel).GetStatus(
                admin_pb.GetStatusRequest(), timeout=10
            )
            return status

    async def update(self, version: str) -> admin_pb.UpdateOutcome:
        async with grpc.aio.insecure_channel(self.box.admin_target) as channel:
            outcome: admin_pb.UpdateOutcome = await admin_grpc.AdminServiceStub(channel).Update(
                admin_pb.UpdateRequest(version=version), timeout=60
            )
            return outcome

    async def rollback(self) -> admin_pb.UpdateOutcome:
        async with grpc.aio.insecure_channel(self.box.admin_target) as channel:
            outcome: admin_pb.UpdateOutcome = await admin_grpc.AdminServiceStub(channel).Rollback(
                admin_pb.RollbackRequest(), timeout=60
            )
            return outcome

    async def until_serving(self, within_s: float = HANG_S) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                if await self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.box.target} not serving after {within_s} s")


class InProcess(Calls):
    """A daemon running in the test's event loop."""

    def __init__(self, box: Box, daemon: Daemon, engines: FakeEngines) -> None:
        super().__init__(box)
        self.daemon, self.engines = daemon, engines
        self.task = asyncio.create_task(daemon.serve(handle_signals=False))

    @property
    def engine(self) -> Any:
        """The fake engine serving now."""
        serving = self.daemon.slot.serving
        assert serving is not None, self.daemon.slot.why_empty
        return serving.engine

    async def exit_code(self, within_s: float = HANG_S) -> int:
        async with asyncio.timeout(within_s):
            return await self.task

    async def stop(self) -> int:
        self.daemon.should_exit = True
        return await self.exit_code()


@contextlib.asynccontextmanager
async def in_process(
    box: Box, probe: FakeProbe | None = None, *, engines: FakeEngines | None = None,
    machine: Callable[[], BoxFacts] | None = None, **settings: str,
) -> AsyncIterator[InProcess]:  # fmt: skip
    """The real daemon on `box` with fake engines (`engines`, or new ones), serving; stopped
    (SIGTERM's path) at the end unless the test ended it. `machine`: what the daemon reads of
    the machine for compile caches' keys (default: this one's)."""
    # the daemon points vLLM and Inductor at its cache
    saved = {name: os.environ.get(name) for name in COMPILE_CACHE_VARIABLES}
    engines = engines or FakeEngines()
    daemon = Daemon(box.settings(**settings), engines, probe or FakeProbe(),
                    **({"box": machine} if machine is not None else {}))  # fmt: skip
    running = InProcess(box, daemon, engines)
    try:
        await _until_serving_or_exit(running)
        yield running
    finally:
        if not running.task.done():
            await running.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def _until_serving_or_exit(running: InProcess) -> None:
    waiting = asyncio.create_task(running.until_serving())
    await asyncio.wait({waiting, running.task}, return_when=asyncio.FIRST_COMPLETED)
    if running.task.done() and not waiting.done():
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        raise AssertionError(f"the daemon exited with {running.task.result()} while starting")
    await waiting


class ChildProcess(Calls):
    """The real daemon with fake engines in a child process (`fast/fake_serve.py`)."""

    def __init__(self, box: Box, launched: Launched) -> None:
        super().__init__(box)
        self.launched, self.process = launched, launched.process

    def wait(self, within_s: float = HANG_S) -> int:
        return self.launched.wait(within_s)

    def tail(self) -> str:
        return self.launched.tail(30)


@contextlib.contextmanager
def child_process(
    box: Box, log_name: str = "daemon.log", *, without_file_override: bool = False, **env: str
) -> Iterator[ChildProcess]:
    """Start the fake-engine daemon as a process on `box` (SIGKILLed at the end if alive).
    `without_file_override`: root, but without the capabilities that let root read any file
    (as an unprivileged service user would be)."""
    command = [sys.executable, "-m", "fast.fake_serve"]
    if without_file_override:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    settings = {**BOX_SETTINGS, "PYTHONPATH": str(TESTS), **env}
    launched = launch(box.root, box.root / "state", box.root / "cache", settings,
                      command=command, log_name=log_name)  # fmt: skip
    try:
        yield ChildProcess(box, launched)
    finally:
        launched.kill()
