"""The composition root: wires settings, model, engine and gRPC server; startup / run / shutdown.

Signal handlers only set flags; the main loop ticks every 0.1 s and notices them. Shutdown runs
in order: health NOT_SERVING, new requests refused, in-flight requests drain for the grace period,
the rest are cancelled in the engine with a reason, the server stops, the engine shuts down.
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from edgeagent.artifacts.manifest import Manifest
from edgeagent.artifacts.prepare import model_to_serve, open_store
from edgeagent.artifacts.store import ModelStore
from edgeagent.engine import Engine, EngineConfig, VllmEngine
from edgeagent.errors import CancelledError, EngineDeadError
from edgeagent.fit import FitRequest, Plan, plan
from edgeagent.gpu import MemoryProbe, default_probe
from edgeagent.server.admin import AdminService
from edgeagent.server.app import ApiServer
from edgeagent.server.inflight import InflightRequests
from edgeagent.server.service import GenerationService, ServedModel
from edgeagent.settings import GiB, Settings
from edgeagent.updates.pipeline import Updater
from edgeagent.updates.sources import DropDirectory, take_drop

logger = logging.getLogger(__name__)

EngineFactory = Callable[[EngineConfig], Engine]
T = TypeVar("T")
TICK_S = 0.1
CANCEL_WAIT_S = 35.0  # a cancelled build's AutoRound process gets 30 s to stop
HEALTH_CHECK_EVERY_S = 5.0
EXIT_OK, EXIT_ENGINE_DIED, EXIT_FORCED = 0, 1, 130


class Daemon:
    def __init__(
        self,
        settings: Settings,
        engine_factory: EngineFactory = VllmEngine.start,
        probe: MemoryProbe | None = None,
    ) -> None:
        self.settings = settings
        self._engine_factory = engine_factory
        self._probe = probe or default_probe()
        self._inflight = InflightRequests()
        self._engine: Engine | None = None
        self._api: ApiServer | None = None
        self._cancel = threading.Event()
        self._drops: DropDirectory | None = None
        self.should_exit = False

    async def serve(self) -> int:
        """Run until a signal or an engine failure; return the process exit code."""
        self._install_signal_handlers()
        try:
            await self.startup()
            return await self.run()
        except CancelledError as stopped:
            logger.info("%s", stopped)
            return EXIT_OK
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        settings = self.settings
        logger.info("effective configuration: %s", json.dumps(settings.redacted(), sort_keys=True))
        for directory in (settings.state_dir, settings.cache_dir, settings.runtime_dir):
            directory.mkdir(parents=True, exist_ok=True)
        # vLLM's compile cache: on an H100 it cuts a restart from ~85 s to ~18 s.
        os.environ["VLLM_CACHE_ROOT"] = str(settings.cache_dir / "vllm")
        store = open_store(settings)
        manifest, model_path, fit = await self._prepare_model(store)
        served = ServedModel(manifest.model_id, manifest.version)
        started = time.perf_counter()
        self._engine = self._engine_factory(self._engine_config(model_path, fit))
        service = GenerationService(self._engine, served, settings.limits, self._inflight)

        def promoted(version: Manifest) -> None:
            service.served = ServedModel(version.model_id, version.version)

        updater = Updater(store, self._engine, self._inflight, manifest, on_promoted=promoted)
        if settings.updates.watch_drop_dir:
            self._watch_drops(store, updater)
        admin = AdminService(updater)
        self._api = ApiServer(service, settings.server, settings.socket_path, admin=admin)
        await self._api.start()
        await self._api.set_serving(True)
        logger.info(
            "serving %s (%s) after %.1f s",
            served.model_id,
            served.version,
            time.perf_counter() - started,
        )

    async def _prepare_model(self, store: ModelStore) -> tuple[Manifest, Path, Plan]:
        """The verified version that fits; fetched or built first when the store is empty."""
        plans: dict[str, Plan] = {}

        def refuse(manifest: Manifest) -> str | None:
            fit = plan(
                manifest.architecture, self._probe.read(), FitRequest.from_settings(self.settings)
            )
            plans[manifest.version] = fit
            return None if fit.fits else "does not fit: " + "; ".join(fit.problems)

        manifest = await self._off_loop(
            lambda: model_to_serve(self.settings, store, self._cancel, refuse)
        )
        fit = plans[manifest.version]
        logger.info(
            "model %s version %s (%s, %s); fit on %s: weights %.2f GiB + overhead %.2f GiB + "
            "KV cache %.2f GiB = %.2f GiB predicted, context %d tokens, %d sequences at full "
            "context%s",
            manifest.model_id, manifest.version, manifest.source_label,
            manifest.quantization_label, fit.device.name, fit.weight_bytes / GiB,
            fit.overhead_bytes / GiB, fit.kv_cache_bytes / GiB, fit.predicted_bytes / GiB,
            fit.max_model_len, fit.max_concurrency, "".join(f"; {n}" for n in fit.notes),
        )  # fmt: skip
        return manifest, store.model_dir(manifest.version), fit

    async def _off_loop(self, work: Callable[[], T]) -> T:
        """Run blocking work (a fetch, a build) on a thread while signals are still noticed.

        On a signal the work is cancelled: a download stops within a chunk and resumes at
        the next start; a build's AutoRound process is stopped.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = work()
            except BaseException as error:  # handed to the event loop, raised there
                loop.call_soon_threadsafe(_settle, done, None, error)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

        worker = threading.Thread(target=run, name="prepare-model", daemon=True)
        worker.start()
        while not done.done():
            if self.should_exit:
                self._cancel.set()
                await asyncio.to_thread(worker.join, CANCEL_WAIT_S)
                raise CancelledError("stopped while preparing the model")
            await asyncio.wait({done}, timeout=TICK_S)
        return done.result()

    def _watch_drops(self, store: ModelStore, updater: Updater) -> None:
        drop = self.settings.drop_dir

        async def ready(candidate: Path) -> None:
            await take_drop(candidate, drop, store, updater)

        self._drops = DropDirectory(drop, ready, asyncio.get_running_loop())
        self._drops.start()
        logger.info("watching %s for model updates (a directory with a READY file)", drop)

    def _engine_config(self, model_path: Path, fit: Plan) -> EngineConfig:
        model = self.settings.model
        return EngineConfig(
            model_path=model_path,
            kv_cache_bytes=fit.kv_cache_bytes,
            max_num_seqs=model.max_num_seqs,
            max_model_len=fit.max_model_len,
            max_num_batched_tokens=model.max_num_batched_tokens,
            gpu_memory_utilization=fit.device_fraction if fit.device.kind == "gpu" else None,
            dtype=model.dtype,
            enforce_eager=model.enforce_eager,
        )

    async def run(self) -> int:
        next_health_check = time.monotonic() + HEALTH_CHECK_EVERY_S
        while not self.should_exit:
            await asyncio.sleep(TICK_S)
            if time.monotonic() >= next_health_check:
                next_health_check = time.monotonic() + HEALTH_CHECK_EVERY_S
                if not await self._engine_healthy():
                    return EXIT_ENGINE_DIED
        return EXIT_OK

    async def _engine_healthy(self) -> bool:
        assert self._engine is not None
        try:
            await self._engine.check_health()
        except EngineDeadError:
            logger.exception("the engine died; stopping so the service manager can restart us")
            return False
        return True

    async def shutdown(self) -> None:
        grace = self.settings.server.drain_grace_s
        if self._api is not None:
            await self._api.enter_graceful_shutdown()
        self._inflight.begin_drain("the server is shutting down; retry on another instance")
        if len(self._inflight):
            logger.info("draining %d request(s) for up to %g s", len(self._inflight), grace)
        if not await self._inflight.wait_idle(grace):
            await self._cancel_inflight(
                f"the server shut down; the request was still running "
                f"after the {grace:g} s drain grace period"
            )
        if self._drops is not None:
            self._drops.stop()
        if self._api is not None:
            await self._api.stop(grace=1.0)
        if self._engine is not None:
            self._engine.shutdown()
        logger.info("stopped")

    async def _cancel_inflight(self, reason: str) -> None:
        assert self._engine is not None
        request_ids = self._inflight.mark_cancelled(reason)
        logger.warning("cancelling %d request(s): %s", len(request_ids), reason)
        for request_id in request_ids:
            await self._engine.abort(request_id)
        await self._inflight.wait_idle(within_s=5.0)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._handle_exit, sig)

    def _handle_exit(self, sig: signal.Signals) -> None:
        if self.should_exit:
            logger.warning("second %s: exiting now without draining", sig.name)
            _kill_descendants()  # the engine's processes would otherwise outlive us
            logging.shutdown()
            os._exit(EXIT_FORCED)
        logger.info("%s received: shutting down", sig.name)
        self.should_exit = True


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def _kill_descendants() -> None:
    """SIGKILL every process below this one (Linux /proc), deepest first."""
    pending, found = [os.getpid()], []
    while pending:
        pid = pending.pop()
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(child) for child in children.read_text().split()]
                found += kids
                pending += kids
    for pid in reversed(found):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
