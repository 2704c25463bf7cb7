"""The engine the daemon serves with: sized by the fit check, started, restarted on another
version, shut down. The update pipeline restarts through it when a candidate's layout differs
from the serving one; the daemon starts it once at startup.

The engine factory and the memory probe are injected, so tests run real small engines against
fake GPU readings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from edgeagent.artifacts.manifest import Manifest
from edgeagent.artifacts.store import ModelStore
from edgeagent.engine import Engine, EngineConfig
from edgeagent.errors import EngineError
from edgeagent.fit import FitRequest, Plan, plan
from edgeagent.gpu import MemoryProbe
from edgeagent.settings import GiB, Settings

logger = logging.getLogger(__name__)

EngineFactory = Callable[[EngineConfig], Engine]


class EngineHost:
    def __init__(
        self, settings: Settings, store: ModelStore, factory: EngineFactory, probe: MemoryProbe
    ) -> None:
        self._settings, self._store = settings, store
        self._factory, self._probe = factory, probe
        self._engine: Engine | None = None
        self._plan: Plan | None = None
        self._closed = False

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise EngineError("no engine is running")
        return self._engine

    def plan(self, manifest: Manifest, *, replacing: bool = False) -> Plan:
        """The fit check for `manifest`; `replacing`: as if the running engine had stopped."""
        device = self._probe.read()
        if replacing and self._plan is not None:
            free = min(device.total_bytes, device.free_bytes + self._plan.predicted_bytes)
            device = dataclasses.replace(device, free_bytes=free)
        return plan(manifest.architecture, device, FitRequest.from_settings(self._settings))

    def start(self, manifest: Manifest, fit: Plan) -> Engine:
        """Start an engine on `manifest` with the sizes of `fit` (blocks for tens of seconds)."""
        engine = self._factory(self._config(manifest, fit))
        if self._closed:  # the daemon shut down while this engine started (an update's restart)
            engine.shutdown()
            raise EngineError(f"shut down while the engine on {manifest.version} started")
        self._engine, self._plan = engine, fit
        logger.info(
            "engine on %s; fit on %s: weights %.2f GiB + overhead %.2f GiB + KV cache %.2f GiB "
            "= %.2f GiB predicted, context %d tokens",
            manifest.version, fit.device.name, fit.weight_bytes / GiB, fit.overhead_bytes / GiB,
            fit.kv_cache_bytes / GiB, fit.predicted_bytes / GiB, fit.max_model_len,
        )  # fmt: skip
        return engine

    async def restart(self, manifest: Manifest) -> Engine:
        """Stop the running engine and start one on `manifest`; raises EngineError when that
        version does not fit or its engine fails to start (then no engine runs)."""
        await asyncio.to_thread(self.stop_engine)
        fit = self.plan(manifest)
        if not fit.fits:
            raise EngineError(f"{manifest.version} does not fit: " + "; ".join(fit.problems))
        try:
            return await asyncio.to_thread(self.start, manifest, fit)
        except EngineError:
            raise
        except Exception as error:  # whatever vLLM raises while starting
            raise EngineError(
                f"the engine failed to start on {manifest.version}: {error}"
            ) from error

    def shutdown(self) -> None:
        """Stop the engine (an engine still starting is stopped once it has started)."""
        self._closed = True
        self.stop_engine()

    def stop_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    def _config(self, manifest: Manifest, fit: Plan) -> EngineConfig:
        model = self._settings.model
        return EngineConfig(
            model_path=self._store.model_dir(manifest.version),
            kv_cache_bytes=fit.kv_cache_bytes,
            max_num_seqs=model.max_num_seqs,
            max_model_len=fit.max_model_len,
            max_num_batched_tokens=model.max_num_batched_tokens,
            gpu_memory_utilization=fit.device_fraction if fit.device.kind == "gpu" else None,
            dtype=model.dtype,
            enforce_eager=model.enforce_eager,
        )
