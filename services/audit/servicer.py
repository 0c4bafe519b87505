"""gRPC servicers: translate protobuf <-> domain, nothing else."""

from __future__ import annotations

import grpc

from medmesh.audit.v1 import audit_service_pb2 as pb
from medmesh.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit_outbox import event_from_pb, event_to_pb
from services.audit.service import AuditService

# Internal-only: the authenticator admits it with the mesh credential, never with a user token.
WRITE_AUDIT_EVENTS = "/medmesh.audit.v1.AuditIngestService/WriteAuditEvents"


class AuditServicer(pb_grpc.AuditServiceServicer):
    def __init__(self, service: AuditService) -> None:
        self._service = service

    async def GetAuditEvent(self, request: pb.GetAuditEventRequest, context: grpc.aio.ServicerContext) -> pb.AuditEvent:
        return event_to_pb(await self._service.get(request.name))

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        page = await self._service.list_events(request.parent, request.filter, request.page_size, request.page_token)
        return pb.ListAuditEventsResponse(
            audit_events=[event_to_pb(e) for e in page.audit_events], next_page_token=page.next_page_token
        )


class AuditIngestServicer(pb_grpc.AuditIngestServiceServicer):
    def __init__(self, service: AuditService) -> None:
        self._service = service

    async def WriteAuditEvents(
        self, request: pb.WriteAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.WriteAuditEventsResponse:
        events = [event_from_pb(m, f"audit_events[{i}]") for i, m in enumerate(request.audit_events)]
        result = await self._service.write(events)
        return pb.WriteAuditEventsResponse(stored_count=result.stored, duplicate_count=result.duplicates)
