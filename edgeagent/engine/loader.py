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
import time
import uuid
from dataclasses import dataclass

from edgeagent.artifacts.manifest import Manifest
from edgeagent.artifacts.store import ModelStore
from edgeagent.engine.interface import Engine, EngineConfig, EngineFactory, SamplingOptions
from edgeagent.engine.slot import Serving
from edgeagent.errors import LoadError
from edgeagent.failpoints import failpoint
from edgeagent.fit import FitRequest, Plan, plan
from edgeagent.gpu import MemoryProbe
from edgeagent.settings import GiB, Settings

logger = logging.getLogger(__name__)

SMOKE_PROMPT = "The quick brown fox"
SMOKE_TOKENS = 8


@dataclass
class LoadTimings:
    """Filled in by a load, for the update's record: the start or reload, then the smoke test."""

    load_s: float = 0.0
    smoke_s: float = 0.0


class EngineLoader:
    def __init__(
        self, settings: Settings, store: ModelStore, factory: EngineFactory, probe: MemoryProbe
    ) -> None:
        self._settings, self._store = settings, store
        self._factory, self._probe = factory, probe
        # The one path every version is served from, in the cache directory beside vLLM's
        # compile cache, whose key it is part of (ModelStore.link_model).
        self._engine_link = settings.cache_dir / "served-model"

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
        request = FitRequest.from_settings(self._settings)
        if beside is not None and request.budget_bytes is not None:
            left = max(0, request.budget_bytes - beside.plan.predicted_bytes)
            request = dataclasses.replace(request, budget_bytes=left)
        return plan(manifest.architecture, device, request)

    async def start(
        self, manifest: Manifest, fit: Plan, timings: LoadTimings | None = None
    ) -> Serving:
        """A new engine on `manifest` sized by `fit`, smoke-tested (blocks for tens of seconds
        off the event loop). On LoadError no engine of this call is left running."""
        timings = timings or LoadTimings()
        if not fit.fits:
            raise LoadError(f"{manifest.version} does not fit: " + "; ".join(fit.problems))
        started = time.perf_counter()
        try:
            engine = await asyncio.to_thread(self._factory, self._config(manifest, fit))
        except Exception as error:  # whatever the engine raises while starting
            raise LoadError(f"the engine failed to start on {manifest.version}: {error}") from error
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

    async def reload(
        self, serving: Serving, manifest: Manifest, timings: LoadTimings | None = None
    ) -> Serving:
        """The running engine with `manifest`'s weights (same layout), smoke-tested. On
        LoadError the engine still runs, with whatever weights the failure left in it."""
        timings = timings or LoadTimings()
        started = time.perf_counter()
        try:
            await serving.engine.reload_weights(self._store.model_dir(manifest.version))
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
        await asyncio.to_thread(serving.engine.shutdown)

    async def smoke_test(self, engine: Engine, timings: LoadTimings | None = None) -> None:
        """A short greedy generation must produce tokens with finite log-probabilities."""
        failpoint("load.smoke_test")
        started = time.perf_counter()
        try:
            await self._generate_finite(engine)
        finally:
            if timings is not None:
                timings.smoke_s = time.perf_counter() - started

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
            kv_cache_dtype=model.kv_cache_dtype,
            async_scheduling=model.async_scheduling,
            speculative=model.speculative,
        )
