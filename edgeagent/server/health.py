"""`grpc.health.v1.Health`, answered from the serving slot: SERVING while a model answers
requests (an update in progress only makes them wait), NOT_SERVING while starting, draining,
or when a failure left nothing loaded. There is no second copy of that state to keep in step."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeagent.engine.slot import ServingSlot
from edgeagent.server.grpc_errors import Context

Status = health_pb2.HealthCheckResponse


class SlotHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped stubs
    def __init__(self, slot: ServingSlot, services: Iterable[str]) -> None:
        self._slot = slot
        self._services = {"", *services}

    def status(self) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        return Status.SERVING if self._slot.accepting else Status.NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in self._services:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return Status(status=self.status())

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if request.service not in self._services:
            yield Status(status=Status.SERVICE_UNKNOWN)
            return
        last = None
        while True:
            if (status := self.status()) != last:
                last = status
                yield Status(status=status)
            await self._slot.changed()
