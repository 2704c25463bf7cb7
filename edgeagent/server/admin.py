"""The admin service: status, update, rollback, over the updater."""

from __future__ import annotations

import grpc

from edgeagent.server.status import Context, errors_as_status
from edgeagent.updates.pipeline import UpdateOutcome, Updater
from edgeagent.v1 import admin_pb2 as pb
from edgeagent.v1 import admin_pb2_grpc as pb_grpc

SERVICE_NAME = "edgeagent.v1.AdminService"
_RESULTS = {
    "promoted": pb.UPDATE_RESULT_PROMOTED,
    "refused": pb.UPDATE_RESULT_REFUSED,
    "rolled_back": pb.UPDATE_RESULT_ROLLED_BACK,
}


class AdminService(pb_grpc.AdminServiceServicer):
    def __init__(self, updater: Updater) -> None:
        self._updater = updater

    async def GetStatus(self, request: pb.GetStatusRequest, context: Context) -> pb.Status:
        serving = self._updater.serving
        return pb.Status(
            model_id=serving.model_id,
            version=serving.version,
            previous_version=self._updater.previous_version or "",
            history=[_outcome(o) for o in self._updater.history],
        )

    async def Update(self, request: pb.UpdateRequest, context: Context) -> pb.UpdateOutcome:
        async with errors_as_status(context):
            return _outcome(await self._updater.update(request.version))
        raise AssertionError("unreachable: errors end the RPC")

    async def Rollback(self, request: pb.RollbackRequest, context: Context) -> pb.UpdateOutcome:
        async with errors_as_status(context):
            return _outcome(await self._updater.rollback())
        raise AssertionError("unreachable: errors end the RPC")


def _outcome(outcome: UpdateOutcome) -> pb.UpdateOutcome:
    return pb.UpdateOutcome(
        kind=outcome.kind,
        version=outcome.version,
        from_version=outcome.from_version,
        result=_RESULTS[outcome.result],
        reason=outcome.reason,
        verify_s=outcome.verify_s,
        pause_s=outcome.pause_s,
        reload_s=outcome.reload_s,
        smoke_s=outcome.smoke_s,
        finished_unix_ms=int(outcome.finished_at * 1000),
    )


def add_to_server(service: AdminService, server: grpc.aio.Server) -> None:
    pb_grpc.add_AdminServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
