"""The observation service's port to the alert service: best-effort evaluation, and its gRPC adapter
against an in-process server speaking the alert contract. (The device directory is shared:
tests/unit/test_runtime_directories.py.)"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from medmesh.alert.v1 import alert_service_pb2 as alert_pb
from medmesh.alert.v1 import alert_service_pb2_grpc as alert_pb_grpc
from medmesh.runtime.errors import Unavailable
from services.observation.alerts import BestEffortAlertEvaluator, GrpcAlertEvaluator, ObservationSample
from tests.integration.platform import free_ports
from tests.unit.test_observation_fakes import RecordingAlertEvaluator

AT = datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)
DEVICE = "devices/SN-1"
SAMPLE = ObservationSample(DEVICE, "organizations/a", "organizations/a/patients/p1", "heart_rate", 151.5, AT)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


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
