"""The organization service as the device service sees it: does an owner (or care organization) exist?"""

from __future__ import annotations

from typing import Protocol

import grpc

from medmesh.organization.v1 import organization_service_pb2 as pb
from medmesh.organization.v1 import organization_service_pb2_grpc as pb_grpc
from medmesh.runtime.errors import PermissionDenied, Unavailable


class OrganizationDirectory(Protocol):
    async def exists(self, organization: str) -> bool: ...


class GrpcOrganizationDirectory:
    """Asks the organization service over gRPC with the caller's token (the mesh channel forwards
    it); the device service stores only the name."""

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
                # The caller may not read that organization (for example lending a device to a
                # care organization they are not a member of): a refusal, not an outage.
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
