"""The organization service as the identity service sees it: does an organization exist?"""

from __future__ import annotations

import grpc

from medmesh.organization.v1 import organization_service_pb2 as pb
from medmesh.organization.v1 import organization_service_pb2_grpc as pb_grpc
from medmesh.runtime.errors import Unavailable


class GrpcOrganizationDirectory:
    """Asks the organization service over gRPC, with the caller's own token (CallerCredentials)."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = 3.0) -> None:
        self._stub = pb_grpc.OrganizationServiceStub(channel)
        self._timeout = timeout

    async def exists(self, organization: str) -> bool:
        try:
            await self._stub.GetOrganization(pb.GetOrganizationRequest(name=organization), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise Unavailable(
                f"cannot check organization {organization!r}: {error.code().name}",
                reason="ORGANIZATION_SERVICE_UNAVAILABLE",
            ) from error
        return True
