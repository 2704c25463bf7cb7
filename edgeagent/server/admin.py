"""The admin service: status (from the serving slot and the updater), update, rollback."""

from __future__ import annotations

import grpc

from edgeagent.engine.slot import ServingSlot
from edgeagent.server.grpc_errors import Context, errors_as_status
from edgeagent.timeline import StartTimeline
from edgeagent.updates.journal import UpdateOutcome
from edgeagent.updates.pipeline import Updater
from edgeagent.v1 import admin_pb2 as pb
from edgeagent.v1 import admin_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdminService"].full_name
_RESULTS = {
    "promoted": pb.UPDATE_RESULT_PROMOTED,
    "refused": pb.UPDATE_RESULT_REFUSED,
    "rolled_back": pb.UPDATE_RESULT_ROLLED_BACK,
    "failed": pb.UPDATE_RESULT_FAILED,
    "interrupted": pb.UPDATE_RESULT_INTERRUPTED,
}


class AdminService(pb_grpc.AdminServiceServicer):
    def __init__(
        self, slot: ServingSlot, updater: Updater, timeline: StartTimeline | None = None
    ) -> None:
        self._slot, self._updater = slot, updater
        self._timeline = timeline or StartTimeline()

    async def GetStatus(self, request: pb.GetStatusRequest, context: Context) -> pb.Status:
        updater, serving = self._updater, self._slot.serving
        return pb.Status(
            model_id=serving.model_id if serving else "",
            version=serving.version if serving else "",
            state=self._slot.state,
            problem=self._slot.why_empty or "",
            previous_version=updater.previous_version or "",
            history=[_outcome(o) for o in updater.journal.history],
            candidate_version=updater.candidate or "",
            probation_left_s=updater.probation_left_s,
            bad_versions=updater.journal.bad,
            next_swap=updater.next_swap(),
            start_timeline=[
                pb.StartPhase(name=name, seconds=seconds) for name, seconds in self._timeline.rows
            ],
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
        method=outcome.method,
        version=outcome.version,
        from_version=outcome.from_version,
        result=_RESULTS[outcome.result],
        reason=outcome.reason,
        verify_s=outcome.verify_s,
        pause_s=outcome.pause_s,
        reload_s=outcome.reload_s,
        smoke_s=outcome.smoke_s,
        gate_s=outcome.gate_s,
        finished_unix_ms=int(outcome.finished_at * 1000),
    )


def add_to_server(service: AdminService, server: grpc.aio.Server) -> None:
    pb_grpc.add_AdminServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
