"""Everything the daemon listens on, started and stopped together: the gRPC servers (generation,
admin, health, reflection), the OpenAI-compatible HTTP API where enabled, and the metrics
endpoint where an address is set."""

from __future__ import annotations

from edgeagent.engine.slot import ServingSlot
from edgeagent.gpu import MemoryProbe
from edgeagent.metrics import Metrics, MetricsServer, serve_metrics
from edgeagent.server.admin import SERVICE_NAME as ADMIN_SERVICE_NAME
from edgeagent.server.admin import AdminService
from edgeagent.server.app import SERVICE_NAME, ApiServer, Tokens
from edgeagent.server.health import SlotHealth
from edgeagent.server.openai.listen import HttpApi
from edgeagent.server.service import GenerationService
from edgeagent.settings import Settings
from edgeagent.timeline import StartTimeline
from edgeagent.updates.pipeline import Updater


class Listeners:
    def __init__(self, settings: Settings, slot: ServingSlot, metrics: Metrics) -> None:
        self._settings, self._slot, self._metrics = settings, slot, metrics
        self.api: ApiServer | None = None
        self.http: HttpApi | None = None
        self.metrics_server: MetricsServer | None = None  # its port: `metrics.address` may say 0

    async def start(self, updater: Updater, timeline: StartTimeline, probe: MemoryProbe) -> None:
        settings, slot, metrics = self._settings, self._slot, self._metrics
        tokens = Tokens(settings.api_token_value, settings.admin_token_value)
        service = GenerationService(slot, settings.limits, metrics,
                                    settings.server.stream_write_timeout_s)  # fmt: skip
        self.api = ApiServer(
            service,
            SlotHealth(slot, [SERVICE_NAME, ADMIN_SERVICE_NAME]), settings.server,
            settings.socket_path, AdminService(slot, updater, timeline),
            settings.admin_socket_path, tokens,
        )  # fmt: skip
        if settings.server.http_enabled:
            self.http = HttpApi(service.core, settings.server, settings.http_socket_path,
                                settings.api_token_value)  # fmt: skip
            await self.http.start()
        if settings.metrics.address:
            metrics.watch_device(probe)
            self.metrics_server = serve_metrics(metrics, settings.metrics.address)
        # gRPC last: its health says SERVING once it listens, so by then the others listen too
        await self.api.start()

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop(grace_s=1.0)
        if self.api is not None:
            await self.api.stop(grace=1.0)
        if self.metrics_server is not None:
            self.metrics_server.stop()
