"""gRPC servicer of DeviceInternalService (mesh only): translates protobuf <-> domain, nothing else."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from medmesh.device.v1 import device_internal_service_pb2 as pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as pb_grpc
from services.device.internal import DeviceInternal
from services.device.servicer import STATE_FROM_PB, struct_of, values_of
from services.device.status import DeviceConnection, StatusReport
from services.device.twin import DesiredConfig

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DeviceInternalService"].full_name
# The full method names to pass as `internal_methods` to the authenticator: they accept the mesh
# credential only, never a user's token.
INTERNAL_METHODS = frozenset(
    f"/{SERVICE_NAME}/{method.name}" for method in pb.DESCRIPTOR.services_by_name["DeviceInternalService"].methods
)


def _time(stamp: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if present else None


def pending_to_pb(pending: DesiredConfig | None) -> pb.PendingConfig:
    if pending is None:
        return pb.PendingConfig()
    return pb.PendingConfig(desired=struct_of(pending.values), desired_version=pending.version)


def connection_to_pb(connection: DeviceConnection) -> pb.DeviceAdapterConnection:
    session = connection.session
    if session is None:
        return pb.DeviceAdapterConnection(device=connection.device)
    return pb.DeviceAdapterConnection(
        device=connection.device,
        connected=connection.connected,
        adapter_instance=session.adapter_instance,
        adapter_address=session.adapter_address,
        session_id=session.session_id,
    )


class DeviceInternalServicer(pb_grpc.DeviceInternalServiceServicer):
    def __init__(self, internal: DeviceInternal) -> None:
        self._internal = internal

    async def GetDeviceAssignment(
        self, request: pb.GetDeviceAssignmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeviceAssignment:
        device = await self._internal.assignment(request.device)
        return pb.DeviceAssignment(
            device=device.name,
            organization=device.organization,
            care_organization=device.care_organization,
            patient=device.patient,
        )

    async def ReportConnection(
        self, request: pb.ReportConnectionRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._internal.report_connection(
            request.device,
            connected=request.connected,
            adapter_instance=request.adapter_instance,
            session_id=request.session_id,
            remote_address=request.remote_address,
            at=_time(request.time, request.HasField("time")),
            adapter_address=request.adapter_address,
        )
        return empty_pb2.Empty()

    async def ReportDeviceStatus(
        self, request: pb.ReportDeviceStatusRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        report = StatusReport(
            state=STATE_FROM_PB.get(request.state),
            message=request.message,
            battery_percent=request.battery_percent if request.HasField("battery_percent") else None,
            firmware_version=request.firmware_version if request.HasField("firmware_version") else None,
        )
        await self._internal.report_status(request.device, report, _time(request.time, request.HasField("time")))
        return empty_pb2.Empty()

    async def ReportConfig(
        self, request: pb.ReportConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.PendingConfig:
        pending = await self._internal.report_config(
            request.device,
            values_of(request.reported),
            request.reported_version,
            _time(request.time, request.HasField("time")),
        )
        return pending_to_pb(pending)

    async def GetPendingConfig(
        self, request: pb.GetPendingConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.PendingConfig:
        return pending_to_pb(await self._internal.pending_config(request.device))

    async def TouchDevice(self, request: pb.TouchDeviceRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._internal.touch(request.device, _time(request.time, request.HasField("time")))
        return empty_pb2.Empty()

    async def GetDeviceConnection(
        self, request: pb.GetDeviceConnectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeviceAdapterConnection:
        return connection_to_pb(await self._internal.connection(request.device))
