"""GrpcDeviceDirectory against a stand-in DeviceInternalService: found, not found, and a peer that fails."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from medmesh.device.v1 import device_internal_service_pb2 as pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as pb_grpc
from medmesh.runtime.errors import Unavailable
from services.alert.devices import GrpcDeviceDirectory
from services.alert.domain import DeviceAssignment


class StandInDevices(pb_grpc.DeviceInternalServiceServicer):
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def GetDeviceAssignment(
        self, request: pb.GetDeviceAssignmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeviceAssignment:
        self.asked.append(request.device)
        if request.device == "devices/SN-1":
            return pb.DeviceAssignment(
                device=request.device,
                organization="organizations/maker",
                care_organization="organizations/a",
                patient="organizations/a/patients/p1",
            )
        if request.device == "devices/broken":
            await context.abort(grpc.StatusCode.INTERNAL, "boom")
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such device")
        raise AssertionError("unreachable")


@pytest.fixture
async def directory() -> AsyncIterator[tuple[GrpcDeviceDirectory, StandInDevices]]:
    devices = StandInDevices()
    server = grpc.aio.server()
    pb_grpc.add_DeviceInternalServiceServicer_to_server(devices, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield GrpcDeviceDirectory(channel), devices
    finally:
        await server.stop(grace=None)


async def test_assignment(directory: tuple[GrpcDeviceDirectory, StandInDevices]) -> None:
    client, devices = directory

    assignment = await client.assignment("devices/SN-1")

    assert assignment == DeviceAssignment(
        "devices/SN-1", "organizations/maker", "organizations/a", "organizations/a/patients/p1"
    )
    assert assignment.data_organization == "organizations/a"
    assert devices.asked == ["devices/SN-1"]


async def test_unknown_device_is_none(directory: tuple[GrpcDeviceDirectory, StandInDevices]) -> None:
    client, _ = directory

    assert await client.assignment("devices/nobody") is None


async def test_a_failing_peer_is_unavailable(directory: tuple[GrpcDeviceDirectory, StandInDevices]) -> None:
    client, _ = directory

    with pytest.raises(Unavailable) as caught:
        await client.assignment("devices/broken")

    assert caught.value.reason == "DEVICE_SERVICE_UNAVAILABLE"
