"""gRPC servicer: translates protobuf <-> domain, nothing else."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import empty_pb2, json_format, struct_pb2

from medmesh.device.v1 import device_service_pb2 as pb
from medmesh.device.v1 import device_service_pb2_grpc as pb_grpc
from medmesh.runtime.protoconv import timestamp
from services.device.domain import Device, DeviceChanges
from services.device.service import DeviceService
from services.device.status import DeviceStatus, OperationalState
from services.device.twin import DeviceConfig

STATE_TO_PB = {
    OperationalState.OK: pb.OperationalStatus.STATE_OK,
    OperationalState.MINOR: pb.OperationalStatus.STATE_MINOR,
    OperationalState.MAJOR: pb.OperationalStatus.STATE_MAJOR,
    OperationalState.CRITICAL: pb.OperationalStatus.STATE_CRITICAL,
}
STATE_FROM_PB = {value: key for key, value in STATE_TO_PB.items()}


def to_pb(device: Device) -> pb.Device:
    return pb.Device(
        name=device.name,
        organization=device.organization,
        display_name=device.display_name,
        model=device.model,
        device_type=device.device_type,
        firmware_version=device.firmware_version,
        hardware_version=device.hardware_version,
        care_organization=device.care_organization,
        patient=device.patient,
        uid=device.uid,
        create_time=timestamp(device.create_time),
        update_time=timestamp(device.update_time),
        etag=device.etag,
    )


def struct_of(values: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def values_of(message: struct_pb2.Struct) -> dict[str, Any]:
    values: dict[str, Any] = json_format.MessageToDict(message)
    return values


def config_to_pb(config: DeviceConfig) -> pb.DeviceConfig:
    message = pb.DeviceConfig(
        name=config.name,
        desired_version=config.desired_version,
        reported_version=config.reported_version,
        in_sync=config.in_sync,
        etag=config.etag,
    )
    if config.desired is not None:
        message.desired.CopyFrom(struct_of(config.desired.values))
        message.desired_update_time.CopyFrom(timestamp(config.desired.update_time))
    if config.reported is not None:
        message.reported.CopyFrom(struct_of(config.reported.values))
        message.reported_update_time.CopyFrom(timestamp(config.reported.update_time))
    return message


def status_to_pb(status: DeviceStatus) -> pb.DeviceStatus:
    message = pb.DeviceStatus(name=status.name)
    connection = message.connection
    connection.SetInParent()  # present even for a device that never connected
    connection.connected = status.connected
    if status.session is not None:
        connection.adapter_instance = status.session.adapter_instance
        connection.remote_address = status.session.remote_address
        connection.connect_time.CopyFrom(timestamp(status.session.connect_time))
        if status.session.disconnect_time is not None:
            connection.disconnect_time.CopyFrom(timestamp(status.session.disconnect_time))
    parts = status.parts
    if parts.last_seen_time is not None:
        connection.last_seen_time.CopyFrom(timestamp(parts.last_seen_time))
    if parts.operational is not None:
        message.operational.CopyFrom(
            pb.OperationalStatus(
                state=STATE_TO_PB[parts.operational.state],
                message=parts.operational.message,
                update_time=timestamp(parts.operational.update_time),
            )
        )
    if parts.battery is not None:
        message.battery_percent = parts.battery.percent
        message.battery_update_time.CopyFrom(timestamp(parts.battery.update_time))
    if parts.firmware is not None:
        message.firmware_version = parts.firmware.version
        message.firmware_update_time.CopyFrom(timestamp(parts.firmware.update_time))
    return message


class DeviceServicer(pb_grpc.DeviceServiceServicer):
    def __init__(self, service: DeviceService) -> None:
        self._service = service

    async def CreateDevice(self, request: pb.CreateDeviceRequest, context: grpc.aio.ServicerContext) -> pb.Device:
        device = await self._service.create(
            request.device_id,
            request.device.organization,
            request.device.display_name,
            request.device.model,
            device_type=request.device.device_type,
            firmware_version=request.device.firmware_version,
            hardware_version=request.device.hardware_version,
        )
        return to_pb(device)

    async def GetDevice(self, request: pb.GetDeviceRequest, context: grpc.aio.ServicerContext) -> pb.Device:
        return to_pb(await self._service.get(request.name))

    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDevicesResponse:
        page = await self._service.list_devices(request.filter, request.page_size, request.page_token)
        return pb.ListDevicesResponse(devices=[to_pb(d) for d in page.devices], next_page_token=page.next_page_token)

    async def UpdateDevice(self, request: pb.UpdateDeviceRequest, context: grpc.aio.ServicerContext) -> pb.Device:
        changes = DeviceChanges(
            display_name=request.device.display_name,
            model=request.device.model,
            organization=request.device.organization,
            device_type=request.device.device_type,
            firmware_version=request.device.firmware_version,
            hardware_version=request.device.hardware_version,
        )
        device = await self._service.update(
            request.device.name, changes, list(request.update_mask.paths), request.device.etag
        )
        return to_pb(device)

    async def DeleteDevice(self, request: pb.DeleteDeviceRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._service.delete(request.name, request.etag)
        return empty_pb2.Empty()

    async def AssignDevice(self, request: pb.AssignDeviceRequest, context: grpc.aio.ServicerContext) -> pb.Device:
        device = await self._service.assign(request.name, request.care_organization, request.patient, request.etag)
        return to_pb(device)

    async def UnassignDevice(self, request: pb.UnassignDeviceRequest, context: grpc.aio.ServicerContext) -> pb.Device:
        return to_pb(await self._service.unassign(request.name, request.patient_only, request.etag))

    async def GetDeviceConfig(
        self, request: pb.GetDeviceConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeviceConfig:
        return config_to_pb(await self._service.get_config(request.name))

    async def UpdateDeviceConfig(
        self, request: pb.UpdateDeviceConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeviceConfig:
        config = await self._service.update_config(
            request.device_config.name,
            values_of(request.device_config.desired),
            list(request.update_mask.paths),
            request.device_config.etag,
        )
        return config_to_pb(config)

    async def GetDeviceStatus(
        self, request: pb.GetDeviceStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeviceStatus:
        return status_to_pb(await self._service.get_status(request.name))
