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

from pydantic import SecretStr

from edgeagent.artifacts.fetch import HubTarget
from edgeagent.artifacts.manifest import Manifest
from edgeagent.artifacts.prepare import hub_fetcher, model_to_serve, open_store
from edgeagent.artifacts.store import ModelStore
from edgeagent.engine import Engine, VllmEngine
from edgeagent.engine_host import EngineFactory, EngineHost
from edgeagent.errors import CancelledError, EdgeAgentError, EngineError
from edgeagent.fit import Plan
from edgeagent.gpu import MemoryProbe, default_probe
from edgeagent.metrics import Metrics, serve_metrics
from edgeagent.offloop import kill_descendants, run_off_loop
from edgeagent.server.admin import AdminService
from edgeagent.server.app import ApiServer, Tokens
from edgeagent.server.inflight import InflightRequests
from edgeagent.server.service import GenerationService, ServedModel
from edgeagent.settings import Settings
from edgeagent.systemd import Notifier, StatusHandler
from edgeagent.updates.hub_poll import HubPoller
from edgeagent.updates.journal import UpdateJournal
from edgeagent.updates.pipeline import Updater
from edgeagent.updates.sources import DropDirectory, take_drop

logger = logging.getLogger(__name__)

T = TypeVar("T")
TICK_S = 0.1
CANCEL_WAIT_S = 35.0  # a cancelled build's AutoRound process gets 30 s to stop
# While the model is prepared and the engine starts, systemd's start timeout is pushed out by
# EXTEND_BY_S every EXTEND_EVERY_S from the main loop (a stuck loop stops it), for at most
# STARTUP_LIMIT_S: fetches and builds report progress, and an engine that takes longer is hung.
EXTEND_EVERY_S, EXTEND_BY_S, STARTUP_LIMIT_S = 10.0, 30.0, 4 * 3600.0
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
        self._host: EngineHost | None = None
        self._updater: Updater | None = None
        self._api: ApiServer | None = None
        self._cancel = threading.Event()
        self._drops: DropDirectory | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stop_metrics: Callable[[], None] | None = None
        self._notifier = Notifier()
        self._started_at = time.monotonic()
        self._next_extend = 0.0
        self._announced: str | None = None
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
        host = self._host = EngineHost(settings, store, self._engine_factory, self._probe)
        manifest, fit = await self._prepare_model(store)
        started = time.perf_counter()
        self._notifier.status(f"starting the engine on {manifest.version}")
        engine = await self._off_loop(lambda: host.start(manifest, fit), cancellable=False)
        metrics = Metrics()
        served = ServedModel(manifest.model_id, manifest.version)
        service = GenerationService(engine, served, settings.limits, self._inflight, metrics)
        self._updater = self._new_updater(store, manifest, service, metrics)
        self._start_update_sources(store, self._updater)
        await self._start_api(service, metrics)
        self._notifier.ready(self._serving_status())
        logger.info(
            "serving %s (%s) after %.1f s",
            served.model_id,
            served.version,
            time.perf_counter() - started,
        )

    def _new_updater(
        self, store: ModelStore, serving: Manifest, service: GenerationService, metrics: Metrics
    ) -> Updater:
        assert self._host is not None
        updates = self.settings.updates

        def promoted(engine: Engine, version: Manifest) -> None:
            service.use(engine, ServedModel(version.model_id, version.version))

        return Updater(
            store, self._host, self._inflight, serving, on_promoted=promoted,
            journal=UpdateJournal(self.settings.state_dir / "updates.json"),
            hold_s=updates.hold_s, probation_s=updates.probation_s,
            on_outcome=lambda o: metrics.updates.labels(o.kind, o.result).inc(),
        )  # fmt: skip

    async def _start_api(self, service: GenerationService, metrics: Metrics) -> None:
        assert self._updater is not None
        settings = self.settings
        self._api = ApiServer(
            service, settings.server, settings.socket_path, AdminService(self._updater),
            settings.admin_socket_path,
            Tokens(_secret(settings.api_token), _secret(settings.admin_token)),
        )  # fmt: skip
        await self._api.start()
        if settings.metrics.address:
            metrics.watch_device(self._probe)
            self._stop_metrics = serve_metrics(metrics, settings.metrics.address).stop
        await self._api.set_serving(True)

    async def _prepare_model(self, store: ModelStore) -> tuple[Manifest, Plan]:
        """The verified version that fits; fetched or built first when the store is empty."""
        assert self._host is not None
        host, plans = self._host, dict[str, Plan]()

        def refuse(manifest: Manifest) -> str | None:
            fit = plans[manifest.version] = host.plan(manifest)
            return None if fit.fits else "does not fit: " + "; ".join(fit.problems)

        self._notifier.status("preparing the model (verify; fetch or build if the store is empty)")
        progress, forward = logging.getLogger("edgeagent.progress"), StatusHandler(self._notifier)
        progress.addHandler(forward)  # fetch and build progress lines, as STATUS= to systemd
        try:
            manifest = await self._off_loop(
                lambda: model_to_serve(self.settings, store, self._cancel, refuse)
            )
        finally:
            progress.removeHandler(forward)
        fit = plans[manifest.version]
        logger.info(
            "model %s version %s (%s, %s), context %d tokens, %d sequences at full context%s",
            manifest.model_id, manifest.version, manifest.source_label,
            manifest.quantization_label, fit.max_model_len, fit.max_concurrency,
            "".join(f"; {n}" for n in fit.notes),
        )  # fmt: skip
        return manifest, fit

    async def _off_loop(self, work: Callable[[], T], cancellable: bool = True) -> T:
        """Run blocking work (a fetch, a build, an engine start) on a thread while signals are
        noticed and systemd hears from the main loop.

        On a signal cancellable work is cancelled: a download stops within a chunk and resumes
        at the next start; a build's AutoRound process is stopped. Other work (an engine start)
        is waited for, then shut down with the rest.
        """
        return await run_off_loop(
            work,
            stop_requested=lambda: self.should_exit,
            cancel=self._cancel,
            cancel_wait_s=CANCEL_WAIT_S if cancellable else None,
            on_tick=self._still_starting,
            tick_s=TICK_S,
        )

    def _still_starting(self) -> None:
        self._notifier.heartbeat()
        now = time.monotonic()
        if now >= self._next_extend and now - self._started_at < STARTUP_LIMIT_S:
            self._next_extend = now + EXTEND_EVERY_S
            self._notifier.extend_timeout(EXTEND_BY_S)

    def _serving_status(self) -> str:
        assert self._updater is not None
        serving = self._updater.serving
        if self._updater.candidate:
            return f"updating to {self._updater.candidate}; serving {serving.version}"
        return f"serving {serving.model_id} {serving.version}"

    def _announce(self) -> None:
        """Tell systemd what is going on when it changed (an update began or ended)."""
        status = self._serving_status()
        if status != self._announced:
            self._announced = status
            self._notifier.status(status)

    def _start_update_sources(self, store: ModelStore, updater: Updater) -> None:
        settings = self.settings
        if settings.updates.watch_drop_dir:
            drop = settings.drop_dir

            async def ready(candidate: Path) -> None:
                await take_drop(candidate, drop, store, updater)

            self._drops = DropDirectory(drop, ready, asyncio.get_running_loop())
            self._drops.start()
            logger.info("watching %s for model updates (a directory with a READY file)", drop)
        if settings.polls_hub:
            updates = settings.updates
            poller = HubPoller(
                hub_fetcher(settings, store), HubTarget(settings.hub.repo, settings.hub.revision),
                updater, interval_s=updates.hub_poll_interval_s, jitter=updates.hub_poll_jitter,
                max_backoff_s=updates.hub_poll_max_backoff_s,
            )  # fmt: skip
            self._poller = asyncio.create_task(poller.run(), name="hub-poll")
            logger.info(
                "polling the hub for new commits of %s every %g s",
                poller.target, updates.hub_poll_interval_s,
            )  # fmt: skip

    async def run(self) -> int:
        next_health_check = time.monotonic() + HEALTH_CHECK_EVERY_S
        while not self.should_exit:
            await asyncio.sleep(TICK_S)
            self._notifier.heartbeat()
            self._announce()
            if time.monotonic() >= next_health_check:
                next_health_check = time.monotonic() + HEALTH_CHECK_EVERY_S
                if not await self._engine_healthy():
                    return EXIT_ENGINE_DIED
        return EXIT_OK

    async def _engine_healthy(self) -> bool:
        """True while the engine answers, or once an update in probation has been rolled back."""
        assert self._host is not None
        assert self._updater is not None
        if self._updater.busy:  # an update is reloading or restarting the engine: it answers
            return True  # for what happens to it, and there may be no engine for a while
        try:
            await self._host.engine.check_health()
        except EngineError as died:  # dead, or none left by a failed update
            try:
                if await self._updater.engine_died(str(died)) is not None:
                    return True
            except EdgeAgentError:  # the fallback failed too, or requests never drained
                logger.exception("the automatic rollback failed")
            logger.exception("the engine died; stopping so the service manager can restart us")
            return False
        return True

    async def shutdown(self) -> None:
        grace = self.settings.server.drain_grace_s
        self._notifier.stopping(f"stopping: draining {len(self._inflight)} request(s)")
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
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._api is not None:
            await self._api.stop(grace=1.0)
        if self._stop_metrics is not None:
            self._stop_metrics()
        if self._host is not None:
            self._host.shutdown()
        self._notifier.close()
        logger.info("stopped")

    async def _cancel_inflight(self, reason: str) -> None:
        assert self._host is not None
        request_ids = self._inflight.mark_cancelled(reason)
        logger.warning("cancelling %d request(s): %s", len(request_ids), reason)
        for request_id in request_ids:
            with contextlib.suppress(EngineError):  # no engine: an update is restarting it
                await self._host.engine.abort(request_id)
        await self._inflight.wait_idle(within_s=5.0)

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


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
