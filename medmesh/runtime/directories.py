"""Peers as other services see them: does an organization exist, who owns a device's data?

Services store only an organization's name; before they write one (a device's owner, a
patient's or a user's organization) they ask the organization service, with the caller's own
token (`CallerCredentials` forwards it), so the caller must be allowed to see it too.

The data-plane services (command, observation, alert, file) ask the device service who owns
what a device produces or receives now, with the mesh credential the channel adds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from medmesh.device.v1 import device_internal_service_pb2 as device_pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as device_pb_grpc
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


DEVICE_CACHE_SECONDS = 5.0
MAX_CACHED_DEVICES = 50_000


@dataclass(frozen=True)
class DeviceAssignment:
    """`medmesh.device.v1.DeviceAssignment`: the shared contract of the data-plane services."""

    device: str  # devices/{id}
    organization: str  # owner, organizations/{o}
    care_organization: str = ""  # organizations/{o}, or "" when not assigned to a care organization
    patient: str = ""  # organizations/{o}/patients/{p}, or "" when not assigned

    @property
    def data_organization(self) -> str:
        """Owner of everything the device produces or receives: its care organization, else its owner."""
        return self.care_organization or self.organization


class DeviceDirectory(Protocol):
    async def assignment(self, device: str) -> DeviceAssignment | None:
        """The device's assignment, None if it does not exist; Unavailable if the device service cannot answer."""
        ...


class GrpcDeviceDirectory:
    """`medmesh.device.v1.DeviceInternalService/GetDeviceAssignment`, with the mesh credential.

    Answers are cached per device for `cache_seconds` (0 turns the cache off), so a burst of
    messages or commands for one device costs one lookup; a device moved to another care
    organization or patient shows within that time. "No such device" is cached too unless
    `cache_absent` is False (a device registered a moment ago is then seen at once). Failures
    are never cached. The cache holds at most `max_entries` devices.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        cache_seconds: float = DEVICE_CACHE_SECONDS,
        timeout: float = 3.0,
        cache_absent: bool = True,
        max_entries: int = MAX_CACHED_DEVICES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = device_pb_grpc.DeviceInternalServiceStub(channel)
        self._cache_seconds = cache_seconds
        self._timeout = timeout
        self._cache_absent = cache_absent
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, DeviceAssignment | None]] = {}

    async def assignment(self, device: str) -> DeviceAssignment | None:
        at = self._clock()
        cached = self._entries.get(device)
        if cached is not None and at - cached[0] < self._cache_seconds:
            return cached[1]
        answer = await self._ask(device)
        if self._cache_seconds > 0 and (answer is not None or self._cache_absent):
            self._remember(device, at, answer)
        else:
            self._entries.pop(device, None)
        return answer

    async def _ask(self, device: str) -> DeviceAssignment | None:
        try:
            reply = await self._stub.GetDeviceAssignment(
                device_pb.GetDeviceAssignmentRequest(device=device), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise Unavailable(
                f"cannot look up device {device!r}: {error.code().name}",
                reason="DEVICE_SERVICE_UNAVAILABLE",
                metadata={"device": device},
            ) from error
        return DeviceAssignment(
            device=reply.device or device,
            organization=reply.organization,
            care_organization=reply.care_organization,
            patient=reply.patient,
        )

    def _remember(self, device: str, at: float, answer: DeviceAssignment | None) -> None:
        if len(self._entries) >= self._max_entries:
            # Expired entries first; if all are fresh, start over (one lookup per device, no harm).
            self._entries = {k: v for k, v in self._entries.items() if at - v[0] < self._cache_seconds}
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
        self._entries[device] = (at, answer)
