"""GrpcDeviceDirectory against a stand-in DeviceInternalService: the shared assignment contract."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from medmesh.device.v1 import device_internal_service_pb2 as pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as pb_grpc
from medmesh.runtime.errors import Unavailable
from services.file.devices import GrpcDeviceDirectory
from services.file.domain import DeviceAssignment


class StandInDevices(pb_grpc.DeviceInternalServiceServicer):
    async def GetDeviceAssignment(
        self, request: pb.GetDeviceAssignmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeviceAssignment:
        if request.device == "devices/SN-1":
            return pb.DeviceAssignment(
                device="devices/SN-1",
                organization="organizations/m",
                care_organization="organizations/a",
                patient="organizations/a/patients/p1",
            )
        if request.device == "devices/BROKEN":
            await context.abort(grpc.StatusCode.INTERNAL, "boom")
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such device")
        raise AssertionError("abort returns no value")


@pytest.fixture
async def directory() -> AsyncIterator[GrpcDeviceDirectory]:
    server = grpc.aio.server()
    pb_grpc.add_DeviceInternalServiceServicer_to_server(StandInDevices(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield GrpcDeviceDirectory(channel)
    finally:
        await server.stop(grace=None)


async def test_an_assigned_device(directory: GrpcDeviceDirectory) -> None:
    assignment = await directory.assignment("devices/SN-1")

    assert assignment == DeviceAssignment(
        "devices/SN-1", "organizations/m", "organizations/a", "organizations/a/patients/p1"
    )
    assert assignment.data_organization == "organizations/a"


async def test_an_unknown_device_is_none(directory: GrpcDeviceDirectory) -> None:
    assert await directory.assignment("devices/NOPE") is None


async def test_a_failing_registry_is_unavailable(directory: GrpcDeviceDirectory) -> None:
    with pytest.raises(Unavailable) as failed:
        await directory.assignment("devices/BROKEN")

    assert failed.value.reason == "DEVICE_SERVICE_UNAVAILABLE"
