"""The observation service's ports to its peers: the device directory (cached) and alert evaluation
(best effort), and their gRPC adapters against in-process servers speaking the peers' contracts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from medmesh.alert.v1 import alert_service_pb2 as alert_pb
from medmesh.alert.v1 import alert_service_pb2_grpc as alert_pb_grpc
from medmesh.device.v1 import device_internal_service_pb2 as device_pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as device_pb_grpc
from medmesh.runtime.errors import Unavailable
from services.observation.alerts import BestEffortAlertEvaluator, GrpcAlertEvaluator, ObservationSample
from services.observation.devices import CachedDeviceDirectory, GrpcDeviceDirectory
from services.observation.domain import DeviceAssignment
from tests.integration.platform import free_ports
from tests.unit.test_observation_fakes import FakeDeviceDirectory, RecordingAlertEvaluator

AT = datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)
DEVICE = "devices/SN-1"
ASSIGNMENT = DeviceAssignment(DEVICE, "organizations/maker", "organizations/a", "organizations/a/patients/p1")
SAMPLE = ObservationSample(DEVICE, "organizations/a", "organizations/a/patients/p1", "heart_rate", 151.5, AT)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- device directory -----------------------------------------------------------------------------


async def test_answers_are_cached_for_a_few_seconds() -> None:
    clock = Clock()
    directory = FakeDeviceDirectory(ASSIGNMENT)
    cached = CachedDeviceDirectory(directory, ttl=5.0, clock=clock)

    assert await cached.assignment(DEVICE) == ASSIGNMENT
    assert await cached.assignment("devices/unknown") is None
    clock.now += 4.9
    assert await cached.assignment(DEVICE) == ASSIGNMENT
    assert await cached.assignment("devices/unknown") is None
    assert directory.asked == [DEVICE, "devices/unknown"]

    # A reassignment shows after the cache time.
    directory.assignments[DEVICE] = DeviceAssignment(DEVICE, "organizations/maker", "organizations/b")
    clock.now += 0.1
    assert (await cached.assignment(DEVICE) or ASSIGNMENT).care_organization == "organizations/b"
    assert directory.asked == [DEVICE, "devices/unknown", DEVICE]


async def test_failures_are_not_cached() -> None:
    directory = FakeDeviceDirectory(ASSIGNMENT, unavailable=True)
    cached = CachedDeviceDirectory(directory, clock=Clock())

    with pytest.raises(Unavailable):
        await cached.assignment(DEVICE)
    directory.unavailable = False
    assert await cached.assignment(DEVICE) == ASSIGNMENT


async def test_the_cache_is_bounded() -> None:
    clock = Clock()
    directory = FakeDeviceDirectory(*(DeviceAssignment(f"devices/d{i}", "organizations/a") for i in range(10)))
    cached = CachedDeviceDirectory(directory, clock=clock, max_entries=4)

    for i in range(10):
        await cached.assignment(f"devices/d{i}")

    assert len(cached._entries) <= 4
    assert await cached.assignment("devices/d9") == DeviceAssignment("devices/d9", "organizations/a")
    assert directory.asked.count("devices/d9") == 1


# --- alert evaluation, best effort ----------------------------------------------------------------


async def test_best_effort_never_raises_logs_once_per_outage_and_pauses(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    alerts = RecordingAlertEvaluator(failing=True)
    evaluator = BestEffortAlertEvaluator(alerts, retry_after=5.0, clock=clock)
    caplog.set_level(logging.INFO, logger="services.observation.alerts")

    await evaluator.evaluate([SAMPLE])
    await evaluator.evaluate([SAMPLE, SAMPLE])  # paused: not even tried
    clock.now += 5.0
    await evaluator.evaluate([SAMPLE])  # tried again, still failing: no second warning

    assert len(alerts.calls) == 2
    assert evaluator.failing
    assert evaluator.skipped_samples == 4
    assert [r.levelname for r in caplog.records] == ["WARNING"]

    alerts.failing = False
    clock.now += 5.0
    await evaluator.evaluate([SAMPLE])

    assert not evaluator.failing
    assert alerts.calls[-1] == [SAMPLE]
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "4 samples were not evaluated" in caplog.records[-1].getMessage()


async def test_nothing_to_evaluate_is_no_call() -> None:
    alerts = RecordingAlertEvaluator()
    await BestEffortAlertEvaluator(alerts).evaluate([])
    assert alerts.calls == []


# --- gRPC adapters --------------------------------------------------------------------------------


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Callable[[grpc.aio.Server], None]], Any]]:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def start(add: Callable[[grpc.aio.Server], None]) -> grpc.aio.Channel:
        server = grpc.aio.server()
        add(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return channel

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(grace=None)


class AlertInternal(alert_pb_grpc.AlertInternalServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def EvaluateObservations(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.requests.append(request)
        return alert_pb.EvaluateObservationsResponse(raised_alerts=["organizations/a/alerts/x"])


async def test_grpc_alert_evaluator_sends_the_alert_contract(serve: Any) -> None:
    alert_service = AlertInternal()
    channel = await serve(lambda s: alert_pb_grpc.add_AlertInternalServiceServicer_to_server(alert_service, s))

    await GrpcAlertEvaluator(channel).evaluate([SAMPLE])

    (request,) = alert_service.requests
    (sample,) = request.samples
    assert (sample.device, sample.organization, sample.patient, sample.metric, sample.value) == (
        DEVICE,
        "organizations/a",
        "organizations/a/patients/p1",
        "heart_rate",
        151.5,
    )
    assert sample.time.ToDatetime(tzinfo=UTC) == AT


async def test_grpc_alert_evaluator_reports_an_unreachable_peer_as_unavailable() -> None:
    (port,) = free_ports(1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(Unavailable) as caught:
            await GrpcAlertEvaluator(channel, timeout=0.5).evaluate([SAMPLE])
    assert caught.value.reason == "ALERT_SERVICE_UNAVAILABLE"


async def test_grpc_device_directory_reads_the_assignment(serve: Any) -> None:
    class DeviceInternal(device_pb_grpc.DeviceInternalServiceServicer):  # type: ignore[misc]
        async def GetDeviceAssignment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request.device != DEVICE:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such device")
            return device_pb.DeviceAssignment(
                device=DEVICE,
                organization="organizations/maker",
                care_organization="organizations/a",
                patient="organizations/a/patients/p1",
            )

    channel = await serve(lambda s: device_pb_grpc.add_DeviceInternalServiceServicer_to_server(DeviceInternal(), s))
    directory = GrpcDeviceDirectory(channel)

    assert await directory.assignment(DEVICE) == ASSIGNMENT
    assert await directory.assignment("devices/unknown") is None


async def test_grpc_device_directory_reports_an_unreachable_peer_as_unavailable() -> None:
    (port,) = free_ports(1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(Unavailable) as caught:
            await GrpcDeviceDirectory(channel, timeout=0.5).assignment(DEVICE)
    assert caught.value.reason == "DEVICE_SERVICE_UNAVAILABLE"
