"""GrpcDeviceDirectory against a fake of the device registry's internal service (the shared contract)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from medmesh.device.v1 import device_internal_service_pb2 as device_pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as device_pb_grpc
from medmesh.runtime.errors import Unavailable
from services.command.devices import DeviceAssignment, GrpcDeviceDirectory


class FakeRegistry(device_pb_grpc.DeviceInternalServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.failure: grpc.StatusCode | None = None
        self.asked: list[str] = []

    async def GetDeviceAssignment(
        self, request: device_pb.GetDeviceAssignmentRequest, context: grpc.aio.ServicerContext
    ) -> device_pb.DeviceAssignment:
        self.asked.append(request.device)
        if self.failure is not None:
            await context.abort(self.failure, "failing on purpose")
        if request.device != "devices/SN-1":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such device")
        return device_pb.DeviceAssignment(
            device="devices/SN-1",
            organization="organizations/m",
            care_organization="organizations/a",
            patient="organizations/a/patients/p1",
        )


@pytest.fixture
async def registry() -> AsyncIterator[tuple[FakeRegistry, GrpcDeviceDirectory]]:
    fake = FakeRegistry()
    server = grpc.aio.server()
    device_pb_grpc.add_DeviceInternalServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield fake, GrpcDeviceDirectory(channel, timeout=2.0)
    finally:
        await server.stop(grace=None)


async def test_an_assignment(registry: tuple[FakeRegistry, GrpcDeviceDirectory]) -> None:
    _, directory = registry

    assignment = await directory.assignment("devices/SN-1")

    assert assignment == DeviceAssignment(
        "devices/SN-1", "organizations/m", "organizations/a", "organizations/a/patients/p1"
    )
    assert assignment is not None
    assert assignment.data_organization == "organizations/a"


async def test_an_unknown_device_is_none(registry: tuple[FakeRegistry, GrpcDeviceDirectory]) -> None:
    _, directory = registry

    assert await directory.assignment("devices/nobody") is None


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL])
async def test_a_failing_registry_is_unavailable(registry: tuple[FakeRegistry, GrpcDeviceDirectory], code: Any) -> None:
    fake, directory = registry
    fake.failure = code

    with pytest.raises(Unavailable) as caught:
        await directory.assignment("devices/SN-1")

    assert caught.value.reason == "DEVICE_SERVICE_UNAVAILABLE"
