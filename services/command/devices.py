"""The device registry as the command service sees it: who owns what a device receives now?

Asked when a command or a session is created. Answers are cached for a few seconds, so a burst
of commands to one device costs one lookup; a device moved to another care organization gets
its next commands under the new one within that time. "No such device" is not cached: a device
registered a moment ago can receive commands at once.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from medmesh.runtime.errors import Unavailable

CACHE_SECONDS = 5.0
MAX_CACHED_DEVICES = 10_000


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
        """The device's assignment, None if it does not exist; Unavailable if the registry cannot answer."""


class CachedDeviceDirectory:
    """Remembers existing devices' assignments for `ttl` seconds; absences and failures are not remembered."""

    def __init__(
        self,
        directory: DeviceDirectory,
        ttl: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_CACHED_DEVICES,
    ) -> None:
        self._directory = directory
        self._ttl = ttl
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[str, tuple[float, DeviceAssignment]] = {}

    async def assignment(self, device: str) -> DeviceAssignment | None:
        at = self._clock()
        cached = self._entries.get(device)
        if cached is not None and at - cached[0] < self._ttl:
            return cached[1]
        answer = await self._directory.assignment(device)
        if answer is None:
            self._entries.pop(device, None)
            return None
        if len(self._entries) >= self._max_entries:
            self._entries = {k: v for k, v in self._entries.items() if at - v[0] < self._ttl}
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
        self._entries[device] = (at, answer)
        return answer


class GrpcDeviceDirectory:
    """`medmesh.device.v1.DeviceInternalService/GetDeviceAssignment`, with the mesh credential."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = 3.0) -> None:
        # Imported when used: the stubs come from the device registry's own proto.
        self._pb: Any = importlib.import_module("medmesh.device.v1.device_internal_service_pb2")
        stubs: Any = importlib.import_module("medmesh.device.v1.device_internal_service_pb2_grpc")
        self._stub = stubs.DeviceInternalServiceStub(channel)
        self._timeout = timeout

    async def assignment(self, device: str) -> DeviceAssignment | None:
        try:
            reply = await self._stub.GetDeviceAssignment(
                self._pb.GetDeviceAssignmentRequest(device=device), timeout=self._timeout
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
