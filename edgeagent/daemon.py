"""The composition root: wires settings, store, engine, updates and the gRPC servers;
startup / run / shutdown, signals, systemd notifications.

Signal handlers only set flags; the main loop ticks every 0.1 s and notices them. Which version
serves is the lifecycle's (updates/lifecycle.py): the start (an update from nothing, falling
back to `previous`), updates and rollbacks, engine death; the daemon runs it, fills an empty
store first (a source like the drop directory and the hub) and exits when nothing can serve.
Shutdown runs in order: health NOT_SERVING, new requests refused, update sources stopped, a
change under way finished, requests in flight drained for the grace period, the rest cancelled
in the engine with a reason, the servers stopped, the engine shut down. A second signal exits at
once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from edgeagent.engine import orphans, worker_forkserver
from edgeagent.engine.interface import EngineFactory
from edgeagent.engine.loader import EngineLoader
from edgeagent.engine.slot import ServingSlot
from edgeagent.engine.vllm_engine import VllmEngine
from edgeagent.errors import StoppedError
from edgeagent.gpu import MemoryProbe, default_probe
from edgeagent.metrics import Metrics
from edgeagent.offloop import kill_descendants, run_off_loop
from edgeagent.preflight import check_settings
from edgeagent.server.app import ApiServer
from edgeagent.server.listeners import Listeners
from edgeagent.server.openai.listen import HttpApi
from edgeagent.settings import Settings
from edgeagent.sources.prepare import acquire_default
from edgeagent.store.compile_key import BoxFacts, probe_box
from edgeagent.store.store import ModelStore, open_store
from edgeagent.store.warm_start import WarmStart
from edgeagent.systemd import Notifier, keep_alive_while_starting, progress_as_status
from edgeagent.tasks import Supervisor
from edgeagent.timeline import StartTimeline
from edgeagent.updates.lifecycle import Lifecycle
from edgeagent.updates.pipeline import Updater
from edgeagent.updates.sources import update_sources

logger = logging.getLogger(__name__)

T = TypeVar("T")
TICK_S = 0.1
CANCEL_WAIT_S = 35.0  # a cancelled build's AutoRound process gets 30 s to stop
EXIT_OK, EXIT_ENGINE_DIED, EXIT_FORCED = 0, 1, 130


class Daemon:
    def __init__(
        self,
        settings: Settings,
        engine_factory: EngineFactory = VllmEngine.start,
        probe: MemoryProbe | None = None,
        box: Callable[[], BoxFacts] = probe_box,
    ) -> None:
        self.settings = settings
        self._box = box  # what a compile cache's key says of this machine
        self.warm_start: WarmStart | None = None
        self.slot = ServingSlot()
        self._engine_factory = engine_factory
        self._probe = probe or default_probe()
        self._tasks = Supervisor()
        self.lifecycle: Lifecycle | None = None
        self.metrics = Metrics()
        self.listeners = Listeners(settings, self.slot, self.metrics)
        self._cancel = threading.Event()
        self._notifier = Notifier()
        self._started_at = time.monotonic()
        self.timeline = StartTimeline()
        self._announced: str | None = None
        self.should_exit = False

    async def serve(self, *, handle_signals: bool = True) -> int:
        """Run until a signal (or `should_exit`) or an engine failure; the process exit code."""
        if handle_signals:
            self._install_signal_handlers()
        try:
            await self.startup()
            return await self.run()
        except StoppedError as stopped:
            logger.info("%s", stopped)
            return EXIT_OK
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        settings, timeline = self.settings, self.timeline
        timeline.mark("interpreter, imports, settings")
        logger.info("effective configuration: %s", json.dumps(settings.redacted(), sort_keys=True))
        check_settings(settings)  # before anything slow: a bad setting costs a second
        # vLLM's compile cache: on an H100 it cuts a restart from ~85 s to ~18 s.
        os.environ["VLLM_CACHE_ROOT"] = str(settings.cache_dir / "vllm")
        # What torch compiles outside vLLM's own cache (the CPU build's precompiled headers)
        # goes to /tmp by default, which the unit's PrivateTmp empties on every start.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.cache_dir / "inductor"))
        timeline.collect_steps(settings.runtime_dir / "start-steps.tsv")  # the engine's processes
        store = open_store(settings)
        metrics = self.metrics
        factory = self._engine_factory
        if settings.store.compile_cache:  # each version's compile cache, in and out
            self.warm_start = WarmStart(store, settings.cache_dir, self._box)
            factory = self.warm_start.wrap(factory)
        loader = EngineLoader(settings, store, factory, self._probe)
        lifecycle = self.lifecycle = Lifecycle(
            settings, store, loader, self.slot, timeline=timeline, off_loop=self._off_loop,
            cancel=self._cancel, status=self._notifier.status,
            on_outcome=lambda o: metrics.updates.labels(o.kind, o.result).inc(),
        )  # fmt: skip
        lifecycle.settle_interrupted()
        timeline.mark("store open, interrupted update settled")
        ticker = asyncio.create_task(
            keep_alive_while_starting(self._notifier, self._started_at, TICK_S),
            name="startup-ticker",
        )
        try:
            await self._fill_empty_store(store)
            serving = await lifecycle.start()
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        if self.should_exit:
            raise StoppedError("stopped while starting the engine")
        metrics.watch_slot(self.slot)
        metrics.watch_updates(lifecycle.journal, lifecycle.updater.gate)
        # The sources before the listeners: once health says SERVING, the drop directory is there
        for name, source in update_sources(settings, store, lifecycle.updater):
            self._tasks.start(name, source)
        await self.listeners.start(lifecycle.updater, timeline, self._probe)
        if (warm := self.warm_start) is not None:
            self._tasks.start("compile-cache-export", lambda: warm.export_loop(
                self._serving_engine, self.slot.changed))  # fmt: skip
        self._notifier.ready(lifecycle.describe())
        timeline.mark("servers up, READY")
        timeline.stop_collecting()
        if (check := lifecycle.check_after_start()) is not None:
            self._tasks.start("check-after-start", check)
        logger.info("serving %s (%s) %.1f s after the process started:\n%s", serving.model_id,
                    serving.version, timeline.total_s, timeline.table())  # fmt: skip

    def _serving_engine(self) -> tuple[object, str] | None:
        serving = self.slot.serving
        return (serving.engine, serving.version) if serving is not None else None

    @property
    def updater(self) -> Updater | None:
        return self.lifecycle.updater if self.lifecycle is not None else None

    @property
    def api(self) -> ApiServer | None:
        return self.listeners.api

    @property
    def http(self) -> HttpApi | None:
        return self.listeners.http

    async def _fill_empty_store(self, store: ModelStore) -> None:
        """A source like the others: an empty store is filled from the configured one."""
        self._notifier.status("preparing the model (verify; fetch or build if the store is empty)")
        if store.refs().current is not None:
            return
        with progress_as_status(self._notifier):
            manifest = await self._off_loop(
                lambda: acquire_default(self.settings, store, self._cancel)
            )
        store.activate(manifest.version)
        self.timeline.mark("model fetched or built (empty store)")

    async def _off_loop(self, work: Callable[[], T]) -> T:
        """Blocking work (a fetch, a build, a verification) on a thread; on a signal it is
        cancelled: a download stops within a chunk and resumes at the next start; a build's
        AutoRound process is stopped."""
        return await run_off_loop(
            work, stop_requested=lambda: self.should_exit, cancel=self._cancel,
            cancel_wait_s=CANCEL_WAIT_S, tick_s=TICK_S,
        )  # fmt: skip

    def _announce(self) -> None:
        """Tell systemd what is going on when it changed (an update began or ended)."""
        status = self.lifecycle.describe() if self.lifecycle is not None else ""
        if status != self._announced:
            self._announced = status
            self._notifier.status(status)

    async def run(self) -> int:
        assert self.lifecycle is not None
        while not self.should_exit:
            await asyncio.sleep(TICK_S)
            self._notifier.heartbeat()
            self._announce()
            if (why := await self.lifecycle.tick()) is not None:
                logger.error("%s; stopping so the service manager restarts us", why)
                return EXIT_ENGINE_DIED
        return EXIT_OK

    async def shutdown(self) -> None:
        slot, grace = self.slot, self.settings.server.drain_grace_s
        self.timeline.stop_collecting()  # a start that failed or was stopped left it
        self._notifier.stopping(f"stopping: draining {len(slot)} request(s)")
        if len(slot):  # counted at the stop, before the background tasks take their time to end
            logger.info("draining %d request(s) for up to %g s", len(slot), grace)
        await slot.begin_drain("the server is shutting down; retry on another instance")
        await self._tasks.stop()
        if self.lifecycle is not None:
            await self.lifecycle.close()  # a change under way is never stopped half-way
        if not await slot.wait_idle(grace):
            cancelled = await slot.cancel(
                f"the server shut down; the request was still running "
                f"after the {grace:g} s drain grace period"
            )
            logger.warning("cancelled %d request(s) still running after the grace", cancelled)
            await slot.wait_idle(within_s=5.0)
        await self.listeners.stop()
        if self.lifecycle is not None:
            await self.lifecycle.unload()
        worker_forkserver.stop()
        orphans.stop_resource_tracker()
        self._notifier.close()
        logger.info("stopped")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._handle_exit, sig)

    def _handle_exit(self, sig: signal.Signals) -> None:
        if self.should_exit:
            logger.warning("second %s: exiting now without draining", sig.name)
            kill_descendants()  # the engine's processes would otherwise outlive us
            logging.shutdown()
            os._exit(EXIT_FORCED)
        logger.info("%s received: shutting down", sig.name)
        self.should_exit = True
