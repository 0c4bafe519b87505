"""The device registry as the file service sees it: whose data is a device's file?"""

from __future__ import annotations

import grpc

from medmesh.device.v1 import device_internal_service_pb2 as pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as pb_grpc
from medmesh.runtime.errors import Unavailable
from services.file.domain import DeviceAssignment


class GrpcDeviceDirectory:
    """Asks `DeviceInternalService.GetDeviceAssignment` with the mesh credential (the channel adds it).

    Asked once per file created, never per byte or per message, so there is no cache: a file
    always goes to the organization the device is assigned to at that moment.
    """

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
                f"cannot look up device {device!r}: {error.code().name}", reason="DEVICE_SERVICE_UNAVAILABLE"
            ) from error
        return DeviceAssignment(
            device=reply.device or device,
            organization=reply.organization,
            care_organization=reply.care_organization,
            patient=reply.patient,
        )
