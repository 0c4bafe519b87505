"""gRPC servicer: translates protobuf <-> domain, nothing else."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from medmesh.device.v1 import device_service_pb2 as pb
from medmesh.device.v1 import device_service_pb2_grpc as pb_grpc
from medmesh.runtime.protoconv import timestamp
from services.device.domain import Device, DeviceChanges
from services.device.service import DeviceService


def to_pb(device: Device) -> pb.Device:
    return pb.Device(
        name=device.name,
        organization=device.organization,
        display_name=device.display_name,
        model=device.model,
        create_time=timestamp(device.create_time),
        update_time=timestamp(device.update_time),
        etag=device.etag,
    )


class DeviceServicer(pb_grpc.DeviceServiceServicer):
    def __init__(self, service: DeviceService) -> None:
        self._service = service

    async def CreateDevice(self, request: pb.CreateDeviceRequest, context: grpc.aio.ServicerContext) -> pb.Device:
        device = await self._service.create(
            request.device_id, request.device.organization, request.device.display_name, request.device.model
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
        )
        device = await self._service.update(
            request.device.name, changes, list(request.update_mask.paths), request.device.etag
        )
        return to_pb(device)

    async def DeleteDevice(self, request: pb.DeleteDeviceRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._service.delete(request.name, request.etag)
        return empty_pb2.Empty()
