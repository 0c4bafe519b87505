"""The organization service as other services see it: does an organization exist?

Services store only an organization's name; before they write one (a device's owner, a
patient's or a user's organization) they ask the organization service, with the caller's own
token (`CallerCredentials` forwards it), so the caller must be allowed to see it too.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from medmesh.organization.v1 import organization_service_pb2 as pb
from medmesh.organization.v1 import organization_service_pb2_grpc as pb_grpc
from medmesh.runtime.errors import FailedPrecondition, FieldViolation, PermissionDenied, Unavailable


class OrganizationDirectory(Protocol):
    async def exists(self, organization: str) -> bool: ...


class GrpcOrganizationDirectory:
    """Asks the organization service over gRPC."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = 3.0) -> None:
        self._stub = pb_grpc.OrganizationServiceStub(channel)
        self._timeout = timeout

    async def exists(self, organization: str) -> bool:
        try:
            await self._stub.GetOrganization(pb.GetOrganizationRequest(name=organization), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return False
            if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                # The caller may not even read the organization: not a fault of the peer.
                raise PermissionDenied(
                    f"the organization service denied access to {organization!r}",
                    reason="ORGANIZATION_ACCESS_DENIED",
                    metadata={"organization": organization},
                ) from error
            raise Unavailable(
                f"cannot check organization {organization!r}: {error.code().name}",
                reason="ORGANIZATION_SERVICE_UNAVAILABLE",
            ) from error
        return True


async def require_existing_organization(directory: OrganizationDirectory, organization: str, field: str) -> None:
    """FAILED_PRECONDITION (ORGANIZATION_NOT_FOUND, naming `field`) unless the organization exists."""
    if not await directory.exists(organization):
        raise FailedPrecondition(
            f"organization {organization!r} does not exist",
            reason="ORGANIZATION_NOT_FOUND",
            metadata={"organization": organization},
            field_violations=[FieldViolation(field, "names an organization that does not exist")],
        )
