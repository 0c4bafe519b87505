"""The device registry as the observation service sees it: who owns a device's data now?

Asked once per ingest batch. The MQTT adapter may send a batch per device message, so answers
(including "no such device") are cached for a few seconds: a device moved to another care
organization or patient is reflected in ingest within that time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import grpc

from medmesh.device.v1 import device_internal_service_pb2 as pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as pb_grpc
from medmesh.runtime.errors import Unavailable
from services.observation.domain import DeviceAssignment

CACHE_SECONDS = 5.0
MAX_CACHED_DEVICES = 50_000


class DeviceDirectory(Protocol):
    async def assignment(self, device: str) -> DeviceAssignment | None:
        """The device's assignment, None if the device does not exist; Unavailable if the registry cannot answer."""


class CachedDeviceDirectory:
    """Remembers answers for `ttl` seconds; failures are not remembered."""

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
        self._entries: dict[str, tuple[float, DeviceAssignment | None]] = {}

    async def assignment(self, device: str) -> DeviceAssignment | None:
        at = self._clock()
        cached = self._entries.get(device)
        if cached is not None and at - cached[0] < self._ttl:
            return cached[1]
        answer = await self._directory.assignment(device)
        if len(self._entries) >= self._max_entries:
            # Expired entries first; if all are fresh, start over (one lookup per device, no harm).
            self._entries = {k: v for k, v in self._entries.items() if at - v[0] < self._ttl}
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
        self._entries[device] = (at, answer)
        return answer


class GrpcDeviceDirectory:
    """`medmesh.device.v1.DeviceInternalService/GetDeviceAssignment`, with the mesh credential."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = 3.0) -> None:
        self._stub = pb_grpc.DeviceInternalServiceStub(channel)
        self._timeout = timeout

    async def assignment(self, device: str) -> DeviceAssignment | None:
        try:
            reply = await self._stub.GetDeviceAssignment(
                pb.GetDeviceAssignmentRequest(device=device), timeout=self._timeout
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
