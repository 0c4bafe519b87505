"""gRPC servicer: translates protobuf <-> domain, nothing else."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from medmesh.organization.v1 import organization_service_pb2 as pb
from medmesh.organization.v1 import organization_service_pb2_grpc as pb_grpc
from medmesh.runtime.protoconv import timestamp
from services.organization.domain import Organization, OrganizationChanges, OrganizationKind
from services.organization.service import OrganizationService

_KIND_TO_PB = {
    OrganizationKind.MANUFACTURER: pb.Organization.KIND_MANUFACTURER,
    OrganizationKind.CARE_PROVIDER: pb.Organization.KIND_CARE_PROVIDER,
}
_KIND_FROM_PB = {value: key for key, value in _KIND_TO_PB.items()}


def to_pb(organization: Organization) -> pb.Organization:
    return pb.Organization(
        name=organization.name,
        display_name=organization.display_name,
        kind=_KIND_TO_PB[organization.kind],
        create_time=timestamp(organization.create_time),
        update_time=timestamp(organization.update_time),
        etag=organization.etag,
    )


class OrganizationServicer(pb_grpc.OrganizationServiceServicer):
    def __init__(self, service: OrganizationService) -> None:
        self._service = service

    async def CreateOrganization(
        self, request: pb.CreateOrganizationRequest, context: grpc.aio.ServicerContext
    ) -> pb.Organization:
        organization = await self._service.create(
            request.organization.display_name,
            _KIND_FROM_PB.get(request.organization.kind),
            request.organization_id,
        )
        return to_pb(organization)

    async def GetOrganization(
        self, request: pb.GetOrganizationRequest, context: grpc.aio.ServicerContext
    ) -> pb.Organization:
        return to_pb(await self._service.get(request.name))

    async def ListOrganizations(
        self, request: pb.ListOrganizationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOrganizationsResponse:
        page = await self._service.list_organizations(request.filter, request.page_size, request.page_token)
        return pb.ListOrganizationsResponse(
            organizations=[to_pb(o) for o in page.organizations], next_page_token=page.next_page_token
        )

    async def UpdateOrganization(
        self, request: pb.UpdateOrganizationRequest, context: grpc.aio.ServicerContext
    ) -> pb.Organization:
        changes = OrganizationChanges(
            display_name=request.organization.display_name,
            kind=_KIND_FROM_PB.get(request.organization.kind),
        )
        organization = await self._service.update(
            request.organization.name, changes, list(request.update_mask.paths), request.organization.etag
        )
        return to_pb(organization)

    async def DeleteOrganization(
        self, request: pb.DeleteOrganizationRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._service.delete(request.name, request.etag)
        return empty_pb2.Empty()
