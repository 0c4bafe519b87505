"""GrpcDeviceDirectory, the data-plane services' one adapter to the device service, against an
in-process DeviceInternalService: found, not found, a failing peer, and the per-device cache."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from medmesh.device.v1 import device_internal_service_pb2 as pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as pb_grpc
from medmesh.runtime.directories import DeviceAssignment, GrpcDeviceDirectory
from medmesh.runtime.errors import Unavailable
from tests.integration.platform import free_ports

DEVICE = "devices/SN-1"
ASSIGNMENT = DeviceAssignment(DEVICE, "organizations/maker", "organizations/a", "organizations/a/patients/p1")


class StandInDevices(pb_grpc.DeviceInternalServiceServicer):  # type: ignore[misc]
    """Answers with `assignments`; fails with `failure` when set; records what it was asked."""

    def __init__(self) -> None:
        self.assignments = {DEVICE: ASSIGNMENT}
        self.failure: grpc.StatusCode | None = None
        self.asked: list[str] = []

    async def GetDeviceAssignment(
        self, request: pb.GetDeviceAssignmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeviceAssignment:
        self.asked.append(request.device)
        if self.failure is not None:
            await context.abort(self.failure, "failing on purpose")
        found = self.assignments.get(request.device)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such device")
            raise AssertionError("abort returns no value")
        return pb.DeviceAssignment(
            device=found.device,
            organization=found.organization,
            care_organization=found.care_organization,
            patient=found.patient,
        )


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


Connect = Callable[..., Awaitable[GrpcDeviceDirectory]]


@pytest.fixture
async def devices() -> AsyncIterator[tuple[StandInDevices, Connect]]:
    """The stand-in service, and a way to make directories (with any options) that ask it."""
    stand_in = StandInDevices()
    server = grpc.aio.server()
    pb_grpc.add_DeviceInternalServiceServicer_to_server(stand_in, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    async def connect(**options: Any) -> GrpcDeviceDirectory:
        return GrpcDeviceDirectory(channel, **{"timeout": 2.0, **options})

    try:
        yield stand_in, connect
    finally:
        await channel.close()
        await server.stop(grace=None)


async def test_an_assignment(devices: tuple[StandInDevices, Connect]) -> None:
    stand_in, connect = devices
    directory = await connect(cache_seconds=0)

    assignment = await directory.assignment(DEVICE)

    assert assignment == ASSIGNMENT
    assert stand_in.asked == [DEVICE]


def test_the_data_organization_is_the_care_organization_else_the_owner() -> None:
    assert ASSIGNMENT.data_organization == "organizations/a"
    assert DeviceAssignment("devices/x", "organizations/m").data_organization == "organizations/m"


async def test_an_unknown_device_is_none(devices: tuple[StandInDevices, Connect]) -> None:
    _, connect = devices

    assert await (await connect()).assignment("devices/nobody") is None


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL])
async def test_a_failing_peer_is_unavailable(devices: tuple[StandInDevices, Connect], code: grpc.StatusCode) -> None:
    stand_in, connect = devices
    stand_in.failure = code

    with pytest.raises(Unavailable) as caught:
        await (await connect()).assignment(DEVICE)

    assert caught.value.reason == "DEVICE_SERVICE_UNAVAILABLE"
    assert caught.value.metadata == {"device": DEVICE}


async def test_an_unreachable_peer_is_unavailable() -> None:
    (port,) = free_ports(1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(Unavailable) as caught:
            await GrpcDeviceDirectory(channel, timeout=0.5).assignment(DEVICE)
    assert caught.value.reason == "DEVICE_SERVICE_UNAVAILABLE"


async def test_answers_and_absences_are_cached_for_a_few_seconds(devices: tuple[StandInDevices, Connect]) -> None:
    stand_in, connect = devices
    clock = Clock()
    directory = await connect(cache_seconds=5.0, clock=clock)

    assert await directory.assignment(DEVICE) == ASSIGNMENT
    assert await directory.assignment("devices/unknown") is None
    clock.now += 4.9
    assert await directory.assignment(DEVICE) == ASSIGNMENT
    assert await directory.assignment("devices/unknown") is None
    assert stand_in.asked == [DEVICE, "devices/unknown"]

    # A reassignment shows after the cache time.
    stand_in.assignments[DEVICE] = DeviceAssignment(DEVICE, "organizations/maker", "organizations/b")
    clock.now += 0.1
    assert (await directory.assignment(DEVICE) or ASSIGNMENT).care_organization == "organizations/b"
    assert stand_in.asked == [DEVICE, "devices/unknown", DEVICE]


async def test_absences_need_not_be_cached(devices: tuple[StandInDevices, Connect]) -> None:
    stand_in, connect = devices
    directory = await connect(cache_seconds=5.0, cache_absent=False, clock=Clock())

    assert await directory.assignment("devices/new") is None
    stand_in.assignments["devices/new"] = DeviceAssignment("devices/new", "organizations/a")
    assert await directory.assignment("devices/new") == DeviceAssignment("devices/new", "organizations/a")
    await directory.assignment("devices/new")

    assert stand_in.asked == ["devices/new", "devices/new"]


async def test_no_cache_asks_every_time(devices: tuple[StandInDevices, Connect]) -> None:
    stand_in, connect = devices
    directory = await connect(cache_seconds=0, clock=Clock())

    await directory.assignment(DEVICE)
    await directory.assignment(DEVICE)

    assert stand_in.asked == [DEVICE, DEVICE]


async def test_failures_are_not_cached(devices: tuple[StandInDevices, Connect]) -> None:
    stand_in, connect = devices
    directory = await connect(clock=Clock())
    stand_in.failure = grpc.StatusCode.UNAVAILABLE

    with pytest.raises(Unavailable):
        await directory.assignment(DEVICE)
    stand_in.failure = None

    assert await directory.assignment(DEVICE) == ASSIGNMENT


async def test_the_cache_is_bounded(devices: tuple[StandInDevices, Connect]) -> None:
    stand_in, connect = devices
    for i in range(10):
        stand_in.assignments[f"devices/d{i}"] = DeviceAssignment(f"devices/d{i}", "organizations/a")
    directory = await connect(clock=Clock(), max_entries=4)

    for i in range(10):
        await directory.assignment(f"devices/d{i}")

    assert len(directory._entries) <= 4
    assert await directory.assignment("devices/d9") == DeviceAssignment("devices/d9", "organizations/a")
    assert stand_in.asked.count("devices/d9") == 1
