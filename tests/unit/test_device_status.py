"""Device status: connections as adapters report them (late and reordered reports included), partial
reports from the device, last seen, who may read it, and the internal service over real gRPC with
the mesh credential."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from medmesh.device.v1 import device_internal_service_pb2 as internal_pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as internal_pb_grpc
from medmesh.device.v1 import device_service_pb2 as pb
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Authenticator, Principal, Role, TokenVerifier, acting_as, internal_principal
from medmesh.runtime.errors import InvalidArgument, NotFound, PermissionDenied
from medmesh.runtime.interceptors import RequestInterceptor
from medmesh.runtime.resources import now
from services.device.domain import Device
from services.device.internal import DeviceInternal
from services.device.internal_servicer import INTERNAL_METHODS, DeviceInternalServicer
from services.device.service import DeviceService
from services.device.servicer import DeviceServicer, status_to_pb
from services.device.status import (
    MAX_EARLY_CLOSES,
    Battery,
    DeviceStatus,
    EarlyClose,
    Firmware,
    Operational,
    OperationalState,
    StatusParts,
    StatusReport,
    event_time,
)
from tests.unit.fakes import FakeOrganizationDirectory, InMemoryRepository
from tests.unit.test_device_fakes import InMemoryConfigStore, InMemoryStatusStore
from tests.unit.test_device_service import StaticKeys, with_token

HOME = "organizations/home"
CARE = "organizations/care"
OTHER = "organizations/other"
DEVICE = "devices/SN-1"
KEY = "uid-SN-1"
ADAPTER = internal_principal("mqtt_adapter")
T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def a_device(serial: str = "SN-1", **values: Any) -> Device:
    created = now()
    return replace(Device(serial, HOME, "Pump", "IP-7", created, created, uid=f"uid-{serial}"), **values)


@pytest.fixture(autouse=True)
def _as_the_adapter() -> Iterator[None]:
    with acting_as(ADAPTER):
        yield


@pytest.fixture
def store() -> InMemoryRepository[Device]:
    store: InMemoryRepository[Device] = InMemoryRepository("device")
    store.put(a_device())
    return store


@pytest.fixture
def statuses() -> InMemoryStatusStore:
    return InMemoryStatusStore()


@pytest.fixture
def internal(store: InMemoryRepository[Device], statuses: InMemoryStatusStore) -> DeviceInternal:
    return DeviceInternal(store, InMemoryConfigStore(), statuses)


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("device")


@pytest.fixture
def service(
    store: InMemoryRepository[Device], statuses: InMemoryStatusStore, trail: RecordingAuditTrail
) -> DeviceService:
    return DeviceService(
        store, FakeOrganizationDirectory({HOME}), trail, configs=InMemoryConfigStore(), statuses=statuses
    )


async def connect(
    internal: DeviceInternal, adapter: str, session: str, seconds: float, address: str = "198.51.100.7"
) -> None:
    await internal.report_connection(
        DEVICE, connected=True, adapter_instance=adapter, session_id=session, remote_address=address, at=at(seconds)
    )


async def disconnect(internal: DeviceInternal, adapter: str, session: str, seconds: float) -> None:
    await internal.report_connection(
        DEVICE, connected=False, adapter_instance=adapter, session_id=session, remote_address="", at=at(seconds)
    )


async def status_of(service: DeviceService) -> DeviceStatus:
    return await service.get_status(f"{DEVICE}/status")


# --- connections --------------------------------------------------------------------------------


async def test_connect_then_disconnect(internal: DeviceInternal, service: DeviceService) -> None:
    await connect(internal, "adapter-1", "s1", 0)
    online = await status_of(service)
    await disconnect(internal, "adapter-1", "s1", 60)
    offline = await status_of(service)

    assert online.connected
    assert not offline.connected
    assert online.session is not None
    assert offline.session is not None
    assert (online.session.adapter_instance, online.session.remote_address) == ("adapter-1", "198.51.100.7")
    assert (online.session.connect_time, online.session.disconnect_time) == (at(0), None)
    assert offline.session.disconnect_time == at(60)
    assert offline.parts.last_seen_time == at(0)  # a disconnect is not hearing from the device
    assert online.name == f"{DEVICE}/status"


async def test_a_late_disconnect_from_the_previous_adapter_leaves_the_device_online(
    internal: DeviceInternal, service: DeviceService, statuses: InMemoryStatusStore
) -> None:
    await connect(internal, "adapter-1", "s1", 0)
    await connect(internal, "adapter-2", "s2", 30)  # the device moved; adapter-1 has not noticed yet
    await disconnect(internal, "adapter-1", "s1", 40)

    status = await status_of(service)

    assert status.connected
    assert status.session is not None
    assert (status.session.adapter_instance, status.session.session_id) == (
        "adapter-2",
        "s2",
    )
    # The late close is remembered only in case s1's connect report were still to come.
    assert statuses.states[KEY].early_closes == (EarlyClose("s1", at(40)),)


async def test_a_late_disconnect_of_an_earlier_connection_to_the_same_adapter(
    internal: DeviceInternal, service: DeviceService
) -> None:
    await connect(internal, "adapter-1", "s1", 0)
    await connect(internal, "adapter-1", "s2", 5)
    await disconnect(internal, "adapter-1", "s1", 6)

    assert (await status_of(service)).connected


async def test_without_session_ids_the_adapter_instance_stands_for_the_session(
    internal: DeviceInternal, service: DeviceService
) -> None:
    await connect(internal, "adapter-1", "", 0)
    await connect(internal, "adapter-2", "", 30)
    await disconnect(internal, "adapter-1", "", 40)
    moved = await status_of(service)
    await disconnect(internal, "adapter-2", "", 50)

    assert moved.connected
    assert not (await status_of(service)).connected


async def test_a_disconnect_reported_before_its_connect_keeps_the_device_offline(
    internal: DeviceInternal, service: DeviceService
) -> None:
    await connect(internal, "adapter-1", "s1", 0)
    await disconnect(internal, "adapter-1", "s1", 10)
    await disconnect(internal, "adapter-2", "s2", 21)  # the reports of s2 raced
    await connect(internal, "adapter-2", "s2", 20)

    status = await status_of(service)

    assert not status.connected
    assert status.session is not None
    assert (status.session.session_id, status.session.adapter_instance) == ("s2", "adapter-2")
    assert (status.session.connect_time, status.session.disconnect_time) == (at(20), at(21))


async def test_a_repeated_connect_report_changes_nothing(
    internal: DeviceInternal, service: DeviceService, statuses: InMemoryStatusStore
) -> None:
    await connect(internal, "adapter-1", "s1", 0)
    await disconnect(internal, "adapter-1", "s1", 10)
    await connect(internal, "adapter-1", "s1", 0)  # a retry arriving late

    assert not (await status_of(service)).connected
    assert statuses.states[KEY].early_closes == ()


async def test_a_late_disconnect_racing_the_new_connect_leaves_the_device_online(
    internal: DeviceInternal, service: DeviceService, statuses: InMemoryStatusStore
) -> None:
    await connect(internal, "adapter-1", "s1", 0)

    async def the_new_connect_comes_in_between(key: str) -> None:
        statuses.before_write = None
        await connect(internal, "adapter-2", "s2", 30)

    # The disconnect read s1 as the newest session; s2's connect is stored before its write.
    statuses.before_write = the_new_connect_comes_in_between
    await disconnect(internal, "adapter-1", "s1", 40)

    status = await status_of(service)
    assert status.connected
    assert status.session is not None
    assert status.session.session_id == "s2"


async def test_a_connect_reported_late_after_its_disconnect_changes_nothing(
    internal: DeviceInternal, service: DeviceService, statuses: InMemoryStatusStore
) -> None:
    await connect(internal, "adapter-2", "s2", 30)
    await disconnect(internal, "adapter-1", "s1", 40)
    await connect(internal, "adapter-1", "s1", 0)  # superseded long before its reports came

    status = await status_of(service)
    assert status.connected
    assert status.session is not None
    assert status.session.session_id == "s2"
    assert statuses.states[KEY].early_closes == ()


async def test_only_the_latest_early_closes_are_kept(internal: DeviceInternal, statuses: InMemoryStatusStore) -> None:
    await connect(internal, "adapter-1", "s0", 0)
    for number in range(1, MAX_EARLY_CLOSES + 3):
        await disconnect(internal, "adapter-1", f"s{number}", number)
    await disconnect(internal, "adapter-1", f"s{MAX_EARLY_CLOSES + 2}", 99)  # repeated: the first time stays

    closes = statuses.states[KEY].early_closes
    assert [close.session_id for close in closes] == [f"s{n}" for n in range(3, MAX_EARLY_CLOSES + 3)]
    assert closes[-1].disconnect_time == at(MAX_EARLY_CLOSES + 2)


async def test_a_session_needs_an_adapter_instance(internal: DeviceInternal) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await connect(internal, "", "", 0)

    assert [v.field for v in caught.value.field_violations] == ["adapter_instance"]


async def test_a_device_that_never_connected(service: DeviceService) -> None:
    status = await status_of(service)

    assert (status.connected, status.session, status.parts) == (False, None, StatusParts())


# --- what the device reports ----------------------------------------------------------------------


async def test_partial_reports_keep_what_they_leave_out(internal: DeviceInternal, service: DeviceService) -> None:
    await internal.report_status(DEVICE, StatusReport(OperationalState.MAJOR, "occlusion", 35, "2.1.0"), at(0))
    await internal.report_status(DEVICE, StatusReport(battery_percent=30), at(10))
    await internal.report_status(DEVICE, StatusReport(OperationalState.OK), at(20))

    parts = (await status_of(service)).parts

    assert parts.operational == Operational(OperationalState.OK, "", at(20))
    assert parts.battery == Battery(30, at(10))
    assert parts.firmware == Firmware("2.1.0", at(0))
    assert parts.last_seen_time == at(20)


@pytest.mark.parametrize(
    ("report", "field"),
    [
        (StatusReport(message="no state"), "message"),
        (StatusReport(battery_percent=101), "battery_percent"),
        (StatusReport(battery_percent=-1), "battery_percent"),
        (StatusReport(OperationalState.OK, "x" * 1001), "message"),
        (StatusReport(firmware_version="v" * 65), "firmware_version"),
    ],
)
async def test_bad_reports_are_invalid_and_keep_nothing(
    internal: DeviceInternal, statuses: InMemoryStatusStore, report: StatusReport, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await internal.report_status(DEVICE, report, at(0))

    assert [v.field for v in caught.value.field_violations] == [field]
    assert await statuses.parts(KEY) == StatusParts()


async def test_an_empty_report_only_says_the_device_was_seen(
    internal: DeviceInternal, statuses: InMemoryStatusStore
) -> None:
    await internal.report_status(DEVICE, StatusReport(), at(5))

    assert await statuses.parts(KEY) == StatusParts(last_seen_time=at(5))


async def test_last_seen_never_goes_back(internal: DeviceInternal, statuses: InMemoryStatusStore) -> None:
    await internal.touch(DEVICE, at(30))
    await internal.touch(DEVICE, at(10))
    await connect(internal, "adapter-1", "s1", 20)

    assert (await statuses.parts(KEY)).last_seen_time == at(30)


def test_times_from_an_adapter_clock_ahead_are_taken_as_now() -> None:
    server_now = at(100)

    assert event_time(None, server_now) == server_now
    assert event_time(at(104), server_now) == at(104)  # within the tolerance
    assert event_time(at(200), server_now) == server_now
    assert event_time(T0.replace(microsecond=123456), server_now) == T0.replace(microsecond=123000)


async def test_reports_record_no_audit_events(
    internal: DeviceInternal, service: DeviceService, trail: RecordingAuditTrail
) -> None:
    await connect(internal, "adapter-1", "s1", 0)
    await internal.report_status(DEVICE, StatusReport(OperationalState.OK), at(1))
    await internal.touch(DEVICE, at(2))
    await disconnect(internal, "adapter-1", "s1", 3)
    await status_of(service)

    assert trail.events == []


async def test_reports_about_unknown_devices_and_from_users(internal: DeviceInternal) -> None:
    with pytest.raises(NotFound) as unknown:
        await internal.touch("devices/SN-404", None)
    with acting_as(Principal(f"{HOME}/users/a", HOME, Role.PLATFORM_ADMIN)), pytest.raises(PermissionDenied) as user:
        await internal.touch(DEVICE, None)

    assert unknown.value.reason == "DEVICE_NOT_FOUND"
    assert user.value.reason == "INTERNAL_ONLY"


async def test_status_is_kept_per_registration(
    internal: DeviceInternal, service: DeviceService, store: InMemoryRepository[Device]
) -> None:
    await connect(internal, "adapter-1", "s1", 0)
    store.put(a_device(uid="uid-SN-1-again"))

    assert not (await status_of(service)).connected


async def test_deleting_a_device_forgets_its_status(
    internal: DeviceInternal, service: DeviceService, statuses: InMemoryStatusStore
) -> None:
    await connect(internal, "adapter-1", "s1", 0)
    await internal.report_status(DEVICE, StatusReport(OperationalState.OK, battery_percent=80), at(1))

    await service.delete(DEVICE, "")

    assert statuses.states == {}
    assert await statuses.parts(KEY) == StatusParts()


# --- who may read it --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caller", "expected"),
    [
        (Principal(f"{HOME}/users/c", HOME, Role.CLINICIAN), "ALLOWED"),
        (Principal(f"{CARE}/users/o", CARE, Role.OPERATOR), "ALLOWED"),
        (Principal(f"{HOME}/users/p", HOME, Role.PATIENT, patient=f"{HOME}/patients/p"), "ROLE_NOT_ALLOWED"),
        (Principal(f"{OTHER}/users/a", OTHER, Role.ORGANIZATION_ADMIN), "ORGANIZATION_ACCESS_DENIED"),
    ],
    ids=lambda value: value.subject if isinstance(value, Principal) else value,
)
async def test_who_may_read_a_lent_devices_status(
    service: DeviceService, store: InMemoryRepository[Device], caller: Principal, expected: str
) -> None:
    store.put(a_device(care_organization=CARE))

    with acting_as(caller):
        if expected == "ALLOWED":
            assert (await status_of(service)).name == f"{DEVICE}/status"
            return
        with pytest.raises(PermissionDenied) as caught:
            await status_of(service)

    assert caught.value.reason == expected


async def test_a_malformed_status_name(service: DeviceService) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.get_status(f"{DEVICE}/config")

    assert caught.value.reason == "INVALID_NAME"


# --- protobuf -------------------------------------------------------------------------------------


def test_status_of_a_device_that_never_connected_to_pb() -> None:
    message = status_to_pb(DeviceStatus(DEVICE, None, StatusParts()))

    assert message.name == f"{DEVICE}/status"
    assert message.HasField("connection")
    assert not message.connection.connected
    assert not message.connection.HasField("connect_time")
    assert not message.HasField("operational")
    assert not message.HasField("battery_percent")


async def test_servicers_carry_every_part(service: DeviceService, internal: DeviceInternal) -> None:
    servicer = DeviceInternalServicer(internal)
    reported = internal_pb.ReportDeviceStatusRequest(
        device=DEVICE, state=pb.OperationalStatus.STATE_CRITICAL, message="pump stopped", battery_percent=0
    )
    reported.time.FromDatetime(at(5))
    connected = internal_pb.ReportConnectionRequest(
        device=DEVICE, connected=True, adapter_instance="adapter-7", session_id="s9", remote_address="203.0.113.5"
    )
    connected.time.FromDatetime(at(1))

    await servicer.ReportConnection(connected, None)
    await servicer.ReportDeviceStatus(reported, None)
    await servicer.ReportDeviceStatus(internal_pb.ReportDeviceStatusRequest(device=DEVICE, firmware_version=""), None)
    await servicer.TouchDevice(internal_pb.TouchDeviceRequest(device=DEVICE), None)
    with acting_as(Principal(f"{HOME}/users/c", HOME, Role.CLINICIAN)):
        message = await DeviceServicer(service).GetDeviceStatus(
            pb.GetDeviceStatusRequest(name=f"{DEVICE}/status"), None
        )

    connection = message.connection
    assert (connection.connected, connection.adapter_instance, connection.remote_address) == (
        True,
        "adapter-7",
        "203.0.113.5",
    )
    assert connection.connect_time.ToDatetime(tzinfo=UTC) == at(1)
    assert not connection.HasField("disconnect_time")
    assert connection.last_seen_time.ToDatetime(tzinfo=UTC) > at(5)  # the touch without a time is "now"
    assert (message.operational.state, message.operational.message) == (
        pb.OperationalStatus.STATE_CRITICAL,
        "pump stopped",
    )
    assert message.operational.update_time.ToDatetime(tzinfo=UTC) == at(5)
    assert message.HasField("battery_percent")
    assert message.battery_percent == 0
    # An explicitly empty firmware version is a report too (optional field present).
    assert message.firmware_version == ""
    assert message.HasField("firmware_update_time")


# --- the internal service over gRPC: the mesh credential, never a user's token -----------------------

MESH_TOKEN = "mesh-secret"


@pytest.fixture
async def internal_address(internal: DeviceInternal) -> AsyncIterator[str]:
    authenticator = Authenticator(
        TokenVerifier(StaticKeys()), internal_methods=INTERNAL_METHODS, internal_token=MESH_TOKEN
    )
    server = grpc.aio.server(interceptors=[RequestInterceptor("device.medmesh", authenticator)])
    internal_pb_grpc.add_DeviceInternalServiceServicer_to_server(DeviceInternalServicer(internal), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def test_every_internal_method_is_internal_only() -> None:
    assert {
        f"/medmesh.device.v1.DeviceInternalService/{name}"
        for name in (
            "GetDeviceAssignment",
            "ReportConnection",
            "ReportDeviceStatus",
            "ReportConfig",
            "GetPendingConfig",
            "TouchDevice",
            "GetDeviceConnection",
        )
    } == INTERNAL_METHODS


async def test_the_mesh_credential_is_needed(internal_address: str, service: DeviceService) -> None:
    admin = with_token(
        Principal("organizations/manufacturer/users/a", "organizations/manufacturer", Role.PLATFORM_ADMIN)
    )
    request = internal_pb.ReportConnectionRequest(device=DEVICE, connected=True, adapter_instance="adapter-1")
    async with grpc.aio.insecure_channel(internal_address) as channel:
        stub = internal_pb_grpc.DeviceInternalServiceStub(channel)  # type: ignore[no-untyped-call]
        await stub.ReportConnection(
            request, metadata=(("x-medmesh-internal", MESH_TOKEN), ("x-medmesh-caller", "mqtt_adapter"))
        )
        with pytest.raises(grpc.aio.AioRpcError) as user:
            await stub.ReportConnection(request, metadata=(("authorization", f"Bearer {admin.token}"),))
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.ReportConnection(
                internal_pb.ReportConnectionRequest(device="devices/bad id", adapter_instance="a"),
                metadata=(("x-medmesh-internal", MESH_TOKEN),),
            )

    assert user.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await status_of(service)).connected
