"""The one path from a stored version to a serving engine: fit check, load, smoke test.

Startup and every update go through it: a new engine (`start`, or `restart` in place of the
running one for another layout) or new weights in the running engine (`reload`); either is
smoke-tested before it is handed back. The engine factory and the memory probe are injected, so
tests drive fake engines against fake GPU readings, and small real ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass

from edgeagent.engine.bounds import StepBounds, within
from edgeagent.engine.interface import Engine, EngineConfig, EngineFactory, SamplingOptions
from edgeagent.engine.placement import (
    Placement,
    beside_verdict,
    require_fit,
    same_layout,
    staging_verdict,
)
from edgeagent.engine.slot import Serving
from edgeagent.errors import EngineError, EngineUnresponsiveError, LoadError
from edgeagent.failpoints import failpoint
from edgeagent.fit import FitRequest, Plan, plan
from edgeagent.gpu import DeviceMemory, MemoryProbe, host_available_bytes
from edgeagent.settings import GiB, Settings
from edgeagent.store.manifest import Manifest
from edgeagent.store.store import ModelStore

logger = logging.getLogger(__name__)

SMOKE_PROMPT = "The quick brown fox"
SMOKE_TOKENS = 8
WORKER_RECORD = "cpu-worker-environment.json"  # under CACHE_DIR/engine (worker_forkserver.py)


@dataclass
class LoadTimings:
    """Filled in by a load, for the update's record: the start, reload or copy, the smoke test
    and the quality gate."""

    load_s: float = 0.0
    smoke_s: float = 0.0
    gate_s: float = 0.0  # the quality gate's scoring of the candidate (the updater's)


class EngineLoader:
    def __init__(
        self, settings: Settings, store: ModelStore, factory: EngineFactory, probe: MemoryProbe
    ) -> None:
        self._settings, self._store = settings, store
        self._factory, self._probe = factory, probe
        # The one path every version is served from, in the cache directory beside vLLM's
        # compile cache, whose key it is part of (ModelStore.link_model).
        self._engine_link = settings.cache_dir / "served-model"
        self.bounds = StepBounds.from_settings(settings)
        # Whether updates will reload weights into this daemon's engines in place (decided at
        # the first start, from its fit: the device does not change while the daemon runs);
        # the engine picks its quantized kernel by it (issue 26).
        self.reloads_in_place: tuple[bool, str] | None = None
        # What each running engine (by id) has staged in host memory: version -> bytes.
        self._staged: dict[int, dict[str, int]] = {}

    def plan(
        self, manifest: Manifest, replacing: Serving | None = None, beside: Serving | None = None
    ) -> Plan:
        """The fit check for `manifest`; `replacing`: as if that engine had stopped; `beside`:
        with that engine still running, which the device's free memory already shows but the
        memory budget (the daemon's, not each engine's) must be told."""
        device = self._probe.read()
        if replacing is not None:
            free = min(device.total_bytes, device.free_bytes + replacing.plan.predicted_bytes)
            device = dataclasses.replace(device, free_bytes=free)
        return self._plan(manifest, device, beside.plan if beside is not None else None)

    def _plan(self, manifest: Manifest, device: DeviceMemory, beside: Plan | None) -> Plan:
        request = FitRequest.from_settings(self._settings)
        if beside is not None and request.budget_bytes is not None:
            left = max(0, request.budget_bytes - beside.predicted_bytes)
            request = dataclasses.replace(request, budget_bytes=left)
        return plan(manifest.architecture, device, request)

    def _updates_in_place(self, manifest: Manifest, fit: Plan) -> tuple[bool, str]:
        """Whether an update of `manifest`'s size will reload in place once an engine sized by
        `fit` serves, as the updater will decide then (`beside_verdict`): a second engine
        planned on the device as `fit` found it, less what the first will take."""
        device = fit.device
        device = dataclasses.replace(device, free_bytes=max(0, device.free_bytes
                                                            - fit.predicted_bytes))  # fmt: skip
        second = self._plan(manifest, device, beside=fit)
        beside, why = beside_verdict(self._settings.updates.swap, second, fit)
        return not beside, why

    def beside(self, candidate: Manifest, serving: Serving) -> tuple[bool, str]:
        """Whether `candidate`'s engine may start beside `serving`'s, with the reason."""
        mode = self._settings.updates.swap
        if mode == "in_place":
            return False, "updates.swap is in_place"
        return beside_verdict(mode, self.plan(candidate, beside=serving), serving.plan)

    def place(self, candidate: Manifest, serving: Serving) -> Placement:
        """How an update loads `candidate` over `serving`: beside it where both fit (and
        `updates.swap` allows), else reloaded in place (same layout), else a new engine in place
        of the old if that fits; LoadError when it does not."""
        beside, why = self.beside(candidate, serving)
        if beside:
            return "beside"
        if self._settings.updates.swap == "beside":
            logger.info("%s cannot start beside %s (%s): swapping in place",
                        candidate.version, serving.version, why)  # fmt: skip
        if same_layout(candidate, serving.manifest):
            return "reload"
        require_fit(candidate, self.plan(candidate, replacing=serving))
        return "restart"

    async def start(
        self, manifest: Manifest, fit: Plan, timings: LoadTimings | None = None, *,
        bounded: bool = True,
    ) -> Serving:  # fmt: skip
        """A new engine on `manifest` sized by `fit`, smoke-tested (blocks for tens of seconds
        off the event loop). On LoadError no engine of this call is left running (one whose
        start ran past its bound is stopped when the start returns). `bounded`: the start
        itself is bounded (not the daemon's first, which systemd's start limit bounds)."""
        timings = timings or LoadTimings()
        require_fit(manifest, fit)
        if self.reloads_in_place is None:
            self.reloads_in_place = self._updates_in_place(manifest, fit)
        started = time.perf_counter()
        try:
            engine = await self._started_engine(manifest, fit, bounded)
        finally:
            timings.load_s = time.perf_counter() - started
        serving = Serving(engine, manifest, fit)
        try:
            await self.smoke_test(engine, timings)
        except LoadError:
            await self.stop(serving)
            raise
        logger.info(
            "engine on %s in %.1f s; fit on %s: weights %.2f GiB + overhead %.2f GiB + KV cache "
            "%.2f GiB = %.2f GiB predicted, context %d tokens",
            manifest.version, timings.load_s, fit.device.name,
            fit.weight_bytes / GiB, fit.overhead_bytes / GiB, fit.kv_cache_bytes / GiB,
            fit.predicted_bytes / GiB, fit.max_model_len,
        )  # fmt: skip
        return serving

    async def _started_engine(self, manifest: Manifest, fit: Plan, bounded: bool) -> Engine:
        """The factory's engine, started on a thread; past its bound the thread cannot be
        stopped, so the engine it returns at last is shut down then."""
        starting = asyncio.get_running_loop().run_in_executor(
            None, self._factory, self._config(manifest, fit)
        )
        bound_s = self.bounds.start_s(fit.weight_bytes) if bounded else None
        try:
            done, _ = await asyncio.wait({starting}, timeout=bound_s)
        except asyncio.CancelledError:
            starting.add_done_callback(_shut_down_when_started)
            raise
        if not done:
            starting.add_done_callback(_shut_down_when_started)
            raise EngineUnresponsiveError(
                f"the engine on {manifest.version} did not start within {bound_s:.1f} s"
            )
        try:
            return starting.result()
        except Exception as error:  # whatever the engine raises while starting
            raise LoadError(f"the engine failed to start on {manifest.version}: {error}") from error

    def staging(self, serving: Serving) -> tuple[bool, str]:
        """Whether an in-place update over `serving` stages in host memory, and why."""
        staged = self._staged.get(id(serving.engine), {})
        return staging_verdict(
            self._settings.updates.stage_in_host_memory, serving.plan.weight_bytes,
            sum(staged.values()), host_available_bytes(),
            int(self._settings.updates.host_reserve_gib * GiB),
        )  # fmt: skip

    async def stage(self, candidate: Manifest, serving: Serving) -> str | None:
        """Before an in-place update's pause, stage `candidate` and the serving weights in host
        memory (the pause is then one copy; putting the old weights back is one copy too);
        None when both are staged, else why not (the pause reloads from disk, as without)."""
        allowed, why = self.staging(serving)
        if not allowed:
            return why
        engine, keys = serving.engine, [serving.version, candidate.version]
        started, bounds = time.perf_counter(), self.bounds
        bound_s = 2 * bounds.reload_s(serving.plan.weight_bytes)  # as two reloads would take
        try:
            await engine.keep_staged(keys)
            await within(engine, self._stage_both(engine, candidate, serving), bound_s,
                         f"the staging of {candidate.version}", bounds.poll_s)  # fmt: skip
            self._staged[id(engine)] = await engine.keep_staged(keys)
        except EngineUnresponsiveError as error:  # the reload in the pause will find it so
            self._staged[id(engine)] = {}
            return f"staging failed ({error})"
        except EngineError as error:
            self._staged[id(engine)] = await _kept(engine, [serving.version])
            return f"staging failed ({error})"
        logger.info("%s and %s staged in host memory in %.2f s (%s)", candidate.version,
                    serving.version, time.perf_counter() - started, why)  # fmt: skip
        return None

    async def _stage_both(self, engine: Engine, candidate: Manifest, serving: Serving) -> None:
        await engine.stage_weights(candidate.version, self._store.model_dir(candidate.version))
        await engine.stage_weights(serving.version, None)

    def _is_staged(self, serving: Serving, version: str) -> bool:
        return version in self._staged.get(id(serving.engine), {})

    async def reload(
        self, serving: Serving, manifest: Manifest, timings: LoadTimings | None = None
    ) -> Serving:
        """The running engine with `manifest`'s weights (same layout), smoke-tested: copied in
        from host memory where `stage` staged them, else reloaded from disk. On LoadError the
        engine still runs, with whatever weights the failure left in it."""
        timings = timings or LoadTimings()
        started = time.perf_counter()
        engine, bounds = serving.engine, self.bounds
        if self._is_staged(serving, manifest.version):
            loading = engine.swap_in_staged(manifest.version)
        else:
            loading = engine.reload_weights(self._store.model_dir(manifest.version))
        try:
            await within(engine, loading, bounds.reload_s(serving.plan.weight_bytes),
                         f"the reload of {manifest.version}", bounds.poll_s)  # fmt: skip
        except EngineUnresponsiveError:
            raise
        except Exception as error:  # any failure inside the engine
            raise LoadError(f"reload of {manifest.version} failed: {error}") from error
        finally:
            timings.load_s = time.perf_counter() - started
        await self.smoke_test(serving.engine, timings)
        return dataclasses.replace(serving, manifest=manifest, since=time.monotonic())

    async def restart(
        self, serving: Serving, manifest: Manifest, timings: LoadTimings | None = None
    ) -> Serving:
        """Stop the running engine and start one on `manifest` (another layout). On LoadError
        no engine runs; the caller puts a version back with `start`."""
        await self.stop(serving)
        return await self.start(manifest, self.plan(manifest), timings)

    async def stop(self, serving: Serving) -> None:
        self._staged.pop(id(serving.engine), None)
        await asyncio.to_thread(serving.engine.shutdown)

    async def still_answers(self, serving: Serving, failure: LoadError) -> bool:
        """Whether `serving`'s engine outlived `failure`: not past a bound, and its health
        check passes (within the step floor)."""
        if isinstance(failure, EngineUnresponsiveError):
            return False
        try:
            async with asyncio.timeout(self.bounds.floor_s):
                await serving.engine.check_health()
        except (EngineError, TimeoutError):
            return False
        return True

    async def smoke_test(self, engine: Engine, timings: LoadTimings | None = None) -> None:
        """A short greedy generation must produce tokens with finite log-probabilities."""
        failpoint("load.smoke_test")
        started, bounds = time.perf_counter(), self.bounds
        try:
            await within(engine, self._generate_finite(engine), bounds.smoke_test_s(SMOKE_TOKENS),
                         "the smoke test", bounds.poll_s)  # fmt: skip
        finally:
            if timings is not None:
                timings.smoke_s = time.perf_counter() - started
        bounds.note_smoke_test(time.perf_counter() - started, SMOKE_TOKENS)

    async def _generate_finite(self, engine: Engine) -> None:
        options = SamplingOptions(max_tokens=SMOKE_TOKENS, temperature=0.0, logprobs=0)
        tokens, logprobs = 0, list[float]()
        request_id = f"smoke-{uuid.uuid4().hex}"
        try:
            async for delta in engine.stream(engine.encode(SMOKE_PROMPT), options, request_id):
                tokens = delta.completion_tokens
                logprobs += delta.logprobs
        except Exception as error:  # an engine error, or anything else the engine raised
            raise LoadError(f"smoke test failed: {error}") from error
        if tokens == 0:
            raise LoadError("smoke test produced no tokens")
        if len(logprobs) != tokens or not all(math.isfinite(p) for p in logprobs):
            raise LoadError(f"smoke test produced non-finite output (log-probabilities {logprobs})")

    def _config(self, manifest: Manifest, fit: Plan) -> EngineConfig:
        model = self._settings.model
        return EngineConfig(
            model_path=self._store.link_model(manifest.version, self._engine_link),
            kv_cache_bytes=fit.kv_cache_bytes,
            max_num_seqs=model.max_num_seqs,
            max_model_len=fit.max_model_len,
            max_num_batched_tokens=model.max_num_batched_tokens,
            gpu_memory_utilization=fit.device_fraction if fit.device.kind == "gpu" else None,
            dtype=model.dtype,
            enforce_eager=model.enforce_eager,
            scheduling_policy=model.scheduling_policy,
            structured_output_backend=model.structured_output_backend,
            json_max_whitespace=model.json_max_whitespace,
            quantized_kernel=model.quantized_kernel,
            reloads_in_place=self.reloads_in_place is not None and self.reloads_in_place[0],
            cpu_quantized_kernel=model.cpu_quantized_kernel,
            kv_cache_dtype=model.kv_cache_dtype,
            async_scheduling=model.async_scheduling,
            speculative=model.speculative,
            worker_record=self._settings.cache_dir / "engine" / WORKER_RECORD,
        )


async def _kept(engine: Engine, keys: list[str]) -> dict[str, int]:
    """After a failed staging: keep only `keys`' sets, if the engine still answers."""
    try:
        return await engine.keep_staged(keys)
    except EngineError:
        return {}


def _shut_down_when_started(starting: asyncio.Future[Engine]) -> None:
    """The engine of a start given up on, once it is up after all: shut down, off the loop."""
    if starting.cancelled() or starting.exception() is not None:
        return
    engine = starting.result()
    logger.warning("an engine start given up on finished after all: shutting that engine down")
    threading.Thread(target=engine.shutdown, name="late-engine-shutdown", daemon=True).start()
