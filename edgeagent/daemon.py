"""The composition root: wires settings, store, engine, updates and the gRPC servers;
startup / run / shutdown.

Signal handlers only set flags; the main loop ticks every 0.1 s and notices them. What is served
lives in one place, the serving slot: startup loads a version into it through the same loader
an update uses (fit check, load, smoke test), the updater swaps it, shutdown empties it.
Shutdown runs in order: health NOT_SERVING, new requests refused, update sources stopped, a
change under way finished, requests in flight drained for the grace period, the rest cancelled
in the engine with a reason, the servers stopped, the engine shut down. A second signal exits at
once.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from edgeagent.artifacts.fetch import HubTarget
from edgeagent.artifacts.manifest import Manifest
from edgeagent.artifacts.prepare import acquire_default, hub_fetcher, open_store
from edgeagent.artifacts.store import ModelStore
from edgeagent.engine import orphans
from edgeagent.engine.interface import EngineFactory
from edgeagent.engine.loader import EngineLoader, LoadTimings
from edgeagent.engine.placement import require_fit
from edgeagent.engine.slot import Serving, ServingSlot
from edgeagent.engine.vllm_engine import VllmEngine
from edgeagent.errors import (
    CorruptArtifactError,
    EdgeAgentError,
    EngineError,
    LoadError,
    NoServableVersionError,
    NotFoundError,
    StoppedError,
)
from edgeagent.gpu import MemoryProbe, default_probe
from edgeagent.metrics import Metrics, serve_metrics
from edgeagent.offloop import kill_descendants, run_off_loop
from edgeagent.preflight import check_settings
from edgeagent.server.admin import SERVICE_NAME as ADMIN_SERVICE_NAME
from edgeagent.server.admin import AdminService
from edgeagent.server.app import SERVICE_NAME, ApiServer, Tokens
from edgeagent.server.health import SlotHealth
from edgeagent.server.openai.listen import HttpApi
from edgeagent.server.service import GenerationService
from edgeagent.settings import Settings
from edgeagent.systemd import Notifier, StatusHandler
from edgeagent.tasks import Supervisor
from edgeagent.timeline import StartTimeline
from edgeagent.updates.drop_dir import DropDirectory, take_drop
from edgeagent.updates.gate import QualityGate
from edgeagent.updates.hub_poll import HubPoller
from edgeagent.updates.journal import UpdateJournal
from edgeagent.updates.pipeline import Probation, Updater
from edgeagent.updates.recovery import ResumedProbation, settle_interrupted

logger = logging.getLogger(__name__)

T = TypeVar("T")
TICK_S = 0.1
CANCEL_WAIT_S = 35.0  # a cancelled build's AutoRound process gets 30 s to stop
# While the model is prepared and the engine starts, systemd's start timeout is pushed out by
# EXTEND_BY_S every EXTEND_EVERY_S from the event loop (a stuck loop stops it), for at most
# STARTUP_LIMIT_S: fetches and builds report progress, and an engine that takes longer is hung.
EXTEND_EVERY_S, EXTEND_BY_S, STARTUP_LIMIT_S = 10.0, 30.0, 4 * 3600.0
EXIT_OK, EXIT_ENGINE_DIED, EXIT_FORCED = 0, 1, 130


class Daemon:
    def __init__(
        self,
        settings: Settings,
        engine_factory: EngineFactory = VllmEngine.start,
        probe: MemoryProbe | None = None,
    ) -> None:
        self.settings = settings
        self.slot = ServingSlot()
        self._engine_factory = engine_factory
        self._probe = probe or default_probe()
        self._tasks = Supervisor()
        self._loader: EngineLoader | None = None
        self._journal: UpdateJournal | None = None
        self.updater: Updater | None = None
        self.api: ApiServer | None = None
        self.http: HttpApi | None = None
        self._cancel = threading.Event()
        self._stop_metrics: Callable[[], None] | None = None
        self._notifier = Notifier()
        self._started_at = time.monotonic()
        self.timeline = StartTimeline()
        self._hash_after_start: str | None = None  # trusted at start, to be hashed once serving
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
        store = open_store(settings)
        journal = self._journal = UpdateJournal(settings.state_dir / "updates.json")
        resumed = settle_interrupted(journal, store)
        loader = self._loader = EngineLoader(settings, store, self._engine_factory, self._probe)
        timeline.mark("store open, interrupted update settled")
        ticker = asyncio.create_task(self._tick_while_starting(), name="startup-ticker")
        try:
            serving = await self._serve_first_servable(store, loader, journal)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        if self.should_exit:
            raise StoppedError("stopped while starting the engine")
        metrics = Metrics()
        metrics.watch_slot(self.slot)
        updates = settings.updates
        self.updater = Updater(
            store, loader, self.slot, journal, hold_s=updates.hold_s,
            probation_s=updates.probation_s, probation=_resume(resumed, serving, store),
            on_outcome=lambda o: metrics.updates.labels(o.kind, o.result).inc(),
            gate=QualityGate(enabled=updates.quality_gate,
                             max_perplexity_ratio=updates.max_perplexity_ratio,
                             min_top1_agreement=updates.min_top1_agreement,
                             bounds=loader.bounds),
        )  # fmt: skip
        await self._start_api(metrics)
        self._start_update_sources(store, self.updater)
        self._notifier.ready(self._serving_status())
        timeline.mark("servers up, READY")
        if (version := self._hash_after_start) is not None:
            self._tasks.start("check-after-start",
                              lambda: self._hash_serving_version(store, version))  # fmt: skip
        logger.info("serving %s (%s) %.1f s after the process started:\n%s", serving.model_id,
                    serving.version, timeline.total_s, timeline.table())  # fmt: skip

    async def _serve_first_servable(
        self, store: ModelStore, loader: EngineLoader, journal: UpdateJournal
    ) -> Serving:
        """Load `current`, else `previous`: the first that verifies, fits and passes its smoke
        test (a version marked bad is not fallen back to). An empty store is filled first."""
        self._notifier.status("preparing the model (verify; fetch or build if the store is empty)")
        if store.refs().current is None:
            with self._progress_to_systemd():
                manifest = await self._off_loop(
                    lambda: acquire_default(self.settings, store, self._cancel)
                )
            store.activate(manifest.version)
            self.timeline.mark("model fetched or built (empty store)")
        failures = []
        for ref in ("current", "previous"):
            try:
                manifest = await self._off_loop(lambda: self._verify_for_start(store, ref))  # noqa: B023
                if ref == "previous" and manifest.version in journal.bad:
                    raise LoadError(f"marked bad: {journal.bad[manifest.version]}")
                return await self._load(loader, manifest)
            except (CorruptArtifactError, NotFoundError, LoadError) as error:
                failures.append(f"{ref}: {error}")
                logger.error("cannot serve the %s version: %s", ref, error)
        raise NoServableVersionError(
            "no servable version: " + "; ".join(failures) + ". Fetch or build one that fits "
            "(`edgeagent fetch`, `edgeagent fit`), then `edgeagent models verify`"
        )

    def _verify_for_start(self, store: ModelStore, ref: str) -> Manifest:
        """`ref`'s manifest once its files check out as `store.verify_on_start` says; a version
        whose files are as they were when last hashed is hashed again after serving starts."""
        mode = self.settings.store.verify_on_start
        if mode == "recorded" and (manifest := store.verified_unchanged(ref)) is not None:
            self._hash_after_start = manifest.version
            self.timeline.mark(f"verification (files as recorded when hashed, {ref})")
            return manifest
        manifest = store.verify(ref, full=mode != "size", cancel=self._cancel)
        self._hash_after_start = None
        self.timeline.mark(f"verification ({'sizes' if mode == 'size' else 'sha256'}, {ref})")
        return manifest

    async def _hash_serving_version(self, store: ModelStore, version: str) -> None:
        """The full check a start skipped; a version that fails it is rolled back from."""
        try:
            await self._off_loop(lambda: store.verify(version, full=True, cancel=self._cancel))
        except CorruptArtifactError as error:
            logger.error("the serving version failed its check after the start: %s; rolling "
                         "back to the previous version", error)  # fmt: skip
            if self.updater is not None and self.updater.serving_version == version:
                try:
                    await self.updater.rollback()
                except EdgeAgentError as failed:
                    logger.error("cannot roll back (%s); %s keeps serving what it loaded "
                                 "before the check", failed, version)  # fmt: skip
            return
        logger.info("version %s passed its full check (sha256 of every file) after the start",
                    version)  # fmt: skip

    async def _load(self, loader: EngineLoader, manifest: Manifest) -> Serving:
        fit = loader.plan(manifest)
        self.timeline.mark("fit check")
        require_fit(manifest, fit)
        logger.info(
            "model %s version %s (%s, %s), context %d tokens, %d sequences at full context%s",
            manifest.model_id, manifest.version, manifest.source_label,
            manifest.quantization_label, fit.max_model_len, fit.max_concurrency,
            "".join(f"; {n}" for n in fit.notes),
        )  # fmt: skip
        self._notifier.status(f"starting the engine on {manifest.version}")
        timings = LoadTimings()
        # The first start is bounded by systemd's start limit, not the loader's (a cold compile).
        serving = await self.slot.swap(
            lambda _: loader.start(manifest, fit, timings, bounded=False), hold_s=0
        )
        assert serving is not None
        self.timeline.split(
            "engine start (vLLM: weights, compile, CUDA graphs, KV cache)", timings.load_s,
            "warm-up (smoke test)",
        )  # fmt: skip
        return serving

    @contextlib.contextmanager
    def _progress_to_systemd(self) -> Iterator[None]:
        """Fetch and build progress lines, forwarded as STATUS= to systemd."""
        progress, forward = logging.getLogger("edgeagent.progress"), StatusHandler(self._notifier)
        progress.addHandler(forward)
        try:
            yield
        finally:
            progress.removeHandler(forward)

    async def _off_loop(self, work: Callable[[], T]) -> T:
        """Blocking work (a fetch, a build, a verification) on a thread; on a signal it is
        cancelled: a download stops within a chunk and resumes at the next start; a build's
        AutoRound process is stopped."""
        return await run_off_loop(
            work, stop_requested=lambda: self.should_exit, cancel=self._cancel,
            cancel_wait_s=CANCEL_WAIT_S, tick_s=TICK_S,
        )  # fmt: skip

    async def _tick_while_starting(self) -> None:
        """Heartbeats, and start timeout extensions for systemd, from the event loop."""
        next_extend = 0.0
        while True:
            self._notifier.heartbeat()
            now = time.monotonic()
            if now >= next_extend and now - self._started_at < STARTUP_LIMIT_S:
                next_extend = now + EXTEND_EVERY_S
                self._notifier.extend_timeout(EXTEND_BY_S)
            await asyncio.sleep(TICK_S)

    async def _start_api(self, metrics: Metrics) -> None:
        assert self.updater is not None
        settings = self.settings
        tokens = Tokens(settings.api_token_value, settings.admin_token_value)
        service = GenerationService(self.slot, settings.limits, metrics,
                                    settings.server.stream_write_timeout_s)  # fmt: skip
        self.api = ApiServer(
            service,
            SlotHealth(self.slot, [SERVICE_NAME, ADMIN_SERVICE_NAME]), settings.server,
            settings.socket_path, AdminService(self.slot, self.updater, self.timeline),
            settings.admin_socket_path, tokens,
        )  # fmt: skip
        await self.api.start()
        if settings.server.http_enabled:
            self.http = HttpApi(service.core, settings.server, settings.http_socket_path,
                                settings.api_token_value)  # fmt: skip
            await self.http.start()
        if settings.metrics.address:
            metrics.watch_device(self._probe)
            self._stop_metrics = serve_metrics(metrics, settings.metrics.address).stop

    def _start_update_sources(self, store: ModelStore, updater: Updater) -> None:
        settings = self.settings
        if settings.updates.watch_drop_dir:
            drop = settings.drop_dir

            async def take(claimed: Path) -> None:
                await take_drop(claimed, drop, store, updater)

            self._tasks.start("drop-directory", DropDirectory(drop, take).run)
            logger.info("watching %s for model updates (a directory with a READY file)", drop)
        if settings.polls_hub:
            updates = settings.updates
            poller = HubPoller(
                hub_fetcher(settings, store), HubTarget(settings.hub.repo, settings.hub.revision),
                updater, interval_s=updates.hub_poll_interval_s, jitter=updates.hub_poll_jitter,
                max_backoff_s=updates.hub_poll_max_backoff_s,
            )  # fmt: skip
            self._tasks.start("hub-poll", poller.run)
            logger.info("polling the hub for new commits of %s every %g s",
                        poller.target, updates.hub_poll_interval_s)  # fmt: skip

    def _serving_status(self) -> str:
        serving, updater = self.slot.serving, self.updater
        if serving is None:
            return f"not serving: {self.slot.why_empty}"
        if updater is not None and updater.candidate:
            return f"updating to {updater.candidate}; serving {serving.version}"
        return f"serving {serving.model_id} {serving.version}"

    def _announce(self) -> None:
        """Tell systemd what is going on when it changed (an update began or ended)."""
        status = self._serving_status()
        if status != self._announced:
            self._announced = status
            self._notifier.status(status)

    async def run(self) -> int:
        assert self.updater is not None
        every_s = self.settings.model.health_check_s
        updater, next_health_check = self.updater, time.monotonic() + every_s
        while not self.should_exit:
            await asyncio.sleep(TICK_S)
            self._notifier.heartbeat()
            self._announce()
            updater.check_probation()
            if self.slot.serving is None and not updater.busy:
                logger.error("%s; stopping so the service manager restarts us", self.slot.why_empty)
                return EXIT_ENGINE_DIED
            if time.monotonic() >= next_health_check:
                next_health_check = time.monotonic() + every_s
                if not await self._engine_healthy(updater):
                    return EXIT_ENGINE_DIED
        return EXIT_OK

    async def _engine_healthy(self, updater: Updater) -> bool:
        """True while the engine answers, or once an update in probation has been rolled back."""
        serving = self.slot.serving
        # An update watches the engines it drives itself: each step it awaits on one is
        # bounded and polls the engine's health (engine/bounds.py).
        if updater.busy or serving is None:
            return True
        try:
            await serving.engine.check_health()
        except EngineError as died:
            try:
                if await updater.engine_died(str(died)) is not None:
                    return True
            except EdgeAgentError:  # the fallback failed too
                logger.exception("the automatic rollback failed")
            logger.error("the engine died (%s); stopping so the service manager restarts us", died)
            return False
        return True

    async def shutdown(self) -> None:
        slot, grace = self.slot, self.settings.server.drain_grace_s
        self._notifier.stopping(f"stopping: draining {len(slot)} request(s)")
        await slot.begin_drain("the server is shutting down; retry on another instance")
        await self._tasks.stop()
        if self.updater is not None:
            await self.updater.close()  # a change under way is never stopped half-way
        if len(slot):
            logger.info("draining %d request(s) for up to %g s", len(slot), grace)
        if not await slot.wait_idle(grace):
            await self._cancel_inflight(
                f"the server shut down; the request was still running "
                f"after the {grace:g} s drain grace period"
            )
        if self.http is not None:
            await self.http.stop(grace_s=1.0)
        if self.api is not None:
            await self.api.stop(grace=1.0)
        if self._stop_metrics is not None:
            self._stop_metrics()
        if slot.serving is not None and self._loader is not None:
            await slot.swap(self._release, hold_s=None)
        orphans.stop_resource_tracker()
        if self._journal is not None:
            self._journal.stopped_cleanly()
        self._notifier.close()
        logger.info("stopped")

    async def _release(self, serving: Serving | None) -> None:
        if serving is not None and self._loader is not None:
            await self._loader.stop(serving)

    async def _cancel_inflight(self, reason: str) -> None:
        request_ids = self.slot.mark_cancelled(reason)
        logger.warning("cancelling %d request(s): %s", len(request_ids), reason)
        serving = self.slot.serving
        for request_id in request_ids:
            if serving is not None:
                with contextlib.suppress(EngineError):
                    await serving.engine.abort(request_id)
        await self.slot.wait_idle(within_s=5.0)

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


def _resume(
    resumed: ResumedProbation | None, serving: Serving, store: ModelStore
) -> Probation | None:
    """The probation an orderly shutdown interrupted, if that version is what serves again."""
    if resumed is None or resumed.version != serving.version:
        return None
    now = time.monotonic()
    return Probation(resumed.version, store.manifest(resumed.fallback),
                     now - resumed.promoted_s_ago, now + resumed.left_s)  # fmt: skip
