"""Which adapter holds a device's connection and where it is reached: stored with the session on
connect, answered by GetDeviceConnection (internal only, over real gRPC with the mesh credential),
read by the other services through GrpcDeviceConnections and by the device service from its own
stores; and a change of the desired configuration pushed to the adapter that holds the device."""

# ruff: noqa: F811 - the fixtures imported from test_device_status are test parameters here
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from medmesh.device.v1 import device_internal_service_pb2 as internal_pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as internal_pb_grpc
from medmesh.runtime.adapters import PENDING_CONFIG, AdapterConnection, AdapterNotifier, GrpcDeviceConnections
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Authenticator, Principal, Role, TokenVerifier, acting_as
from medmesh.runtime.clients import peer_channel
from medmesh.runtime.errors import NotFound, PermissionDenied
from medmesh.runtime.interceptors import RequestInterceptor
from services.device.domain import Device
from services.device.internal import DeviceInternal
from services.device.internal_servicer import INTERNAL_METHODS, DeviceInternalServicer, connection_to_pb
from services.device.notifier import AdapterConfigNotifier, RepositoryConnections
from services.device.repository import _session
from services.device.service import DeviceService
from services.device.status import Session
from services.device.twin import DesiredConfigNotifier
from tests.unit.adapter_stub import StubAdapter, serving_stub_adapter
from tests.unit.fakes import FakeOrganizationDirectory, InMemoryRepository
from tests.unit.test_device_fakes import InMemoryConfigStore, InMemoryStatusStore
from tests.unit.test_device_service import StaticKeys, with_token
from tests.unit.test_device_status import (  # the registry and the adapter's identity; fixtures too
    DEVICE,
    HOME,
    KEY,
    T0,
    _as_the_adapter,  # noqa: F401 - autouse fixture
    a_device,
    at,
    internal,  # noqa: F401 - fixture
    statuses,  # noqa: F401 - fixture
    store,  # noqa: F401 - fixture
)

OPERATOR = Principal(f"{HOME}/users/op", HOME, Role.OPERATOR)
MESH_TOKEN = "device-connection-test-credential"


async def report(
    internal: DeviceInternal,
    *,
    connected: bool,
    session: str,
    seconds: float,
    adapter: str = "adapter-1",
    address: str = "",
    device: str = DEVICE,
) -> None:
    await internal.report_connection(
        device,
        connected=connected,
        adapter_instance=adapter,
        session_id=session,
        remote_address="198.51.100.7" if connected else "",
        at=at(seconds),
        adapter_address=address,
    )


# --- stored with the session, answered by the device service -----------------------------------------


async def test_the_adapter_address_reported_on_connect_is_the_connections(internal: DeviceInternal) -> None:
    await report(internal, connected=True, session="s1", seconds=0, address="10.0.0.7:50060")

    connection = await internal.connection(DEVICE)

    assert connection.connected
    assert connection.session is not None
    assert (connection.session.adapter_instance, connection.session.adapter_address) == ("adapter-1", "10.0.0.7:50060")
    assert connection_to_pb(connection) == internal_pb.DeviceAdapterConnection(
        device=DEVICE,
        connected=True,
        adapter_instance="adapter-1",
        adapter_address="10.0.0.7:50060",
        session_id="s1",
    )


async def test_a_device_that_moved_is_reached_at_its_new_adapter(internal: DeviceInternal) -> None:
    await report(internal, connected=True, session="s1", seconds=0, address="10.0.0.7:50060")
    await report(internal, connected=True, session="s2", seconds=30, adapter="adapter-2", address="10.0.0.8:50060")
    # adapter-1 notices the old connection is gone only now: it must not hide the new one.
    await report(internal, connected=False, session="s1", seconds=31)

    connection = await internal.connection(DEVICE)

    assert connection.connected
    assert connection.session is not None
    assert (connection.session.adapter_instance, connection.session.adapter_address) == ("adapter-2", "10.0.0.8:50060")


async def test_after_a_disconnect_the_last_adapter_is_known_but_not_connected(internal: DeviceInternal) -> None:
    await report(internal, connected=True, session="s1", seconds=0, address="10.0.0.7:50060")
    await report(internal, connected=False, session="s1", seconds=60)

    message = connection_to_pb(await internal.connection(DEVICE))

    assert not message.connected
    assert (message.adapter_instance, message.adapter_address) == ("adapter-1", "10.0.0.7:50060")


async def test_a_connect_reported_after_its_disconnect_fills_in_the_address_and_stays_closed(
    internal: DeviceInternal, statuses: InMemoryStatusStore
) -> None:
    await report(internal, connected=False, session="s1", seconds=60)
    await report(internal, connected=True, session="s1", seconds=0, address="10.0.0.7:50060")

    session = statuses.states[KEY].newest
    assert session is not None
    assert session.adapter_address == "10.0.0.7:50060"
    assert not session.open
    assert not (await internal.connection(DEVICE)).connected


async def test_a_device_that_never_connected_has_only_its_name(internal: DeviceInternal) -> None:
    connection = await internal.connection(DEVICE)

    assert connection.session is None
    assert connection_to_pb(connection) == internal_pb.DeviceAdapterConnection(device=DEVICE)


async def test_an_unknown_device_is_not_found(internal: DeviceInternal) -> None:
    with pytest.raises(NotFound) as missing:
        await internal.connection("devices/nope")

    assert missing.value.reason == "DEVICE_NOT_FOUND"


async def test_only_the_mesh_may_ask(internal: DeviceInternal) -> None:
    with acting_as(OPERATOR), pytest.raises(PermissionDenied):
        await internal.connection(DEVICE)


def test_sessions_stored_before_adapters_reported_addresses_have_none() -> None:
    document = {
        "device_key": KEY,
        "session_id": "s1",
        "adapter_instance": "adapter-1",
        "remote_address": "198.51.100.7",
        "connect_time": T0,
        "disconnect_time": None,
    }

    assert _session(document) == Session(KEY, "s1", "adapter-1", "198.51.100.7", T0)
    assert _session({**document, "adapter_address": "10.0.0.7:50060"}).adapter_address == "10.0.0.7:50060"


# --- over gRPC, with the mesh credential ----------------------------------------------------------


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


MESH = (("x-medmesh-internal", MESH_TOKEN), ("x-medmesh-caller", "mqtt_adapter"))


async def test_report_and_read_back_over_grpc(internal_address: str) -> None:
    async with grpc.aio.insecure_channel(internal_address) as channel:
        stub = internal_pb_grpc.DeviceInternalServiceStub(channel)  # type: ignore[no-untyped-call]
        await stub.ReportConnection(
            internal_pb.ReportConnectionRequest(
                device=DEVICE,
                connected=True,
                adapter_instance="adapter-1",
                session_id="s1",
                adapter_address="10.0.0.7:50060",
            ),
            metadata=MESH,
        )
        reply = await stub.GetDeviceConnection(internal_pb.GetDeviceConnectionRequest(device=DEVICE), metadata=MESH)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.GetDeviceConnection(internal_pb.GetDeviceConnectionRequest(device="devices/nope"), metadata=MESH)
        admin = with_token(Principal("organizations/m/users/a", "organizations/m", Role.PLATFORM_ADMIN))
        with pytest.raises(grpc.aio.AioRpcError) as user:
            await stub.GetDeviceConnection(
                internal_pb.GetDeviceConnectionRequest(device=DEVICE),
                metadata=(("authorization", f"Bearer {admin.token}"),),
            )
        with pytest.raises(grpc.aio.AioRpcError) as too_long:
            await stub.ReportConnection(
                internal_pb.ReportConnectionRequest(
                    device=DEVICE, connected=True, adapter_instance="adapter-1", adapter_address="a" * 201
                ),
                metadata=MESH,
            )

    assert reply == internal_pb.DeviceAdapterConnection(
        device=DEVICE, connected=True, adapter_instance="adapter-1", adapter_address="10.0.0.7:50060", session_id="s1"
    )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert user.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "adapter_address" in str(too_long.value.details())


async def test_other_services_look_connections_up_over_grpc(
    internal_address: str, internal: DeviceInternal, store: InMemoryRepository[Device], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDMESH_INTERNAL_TOKEN", MESH_TOKEN)
    store.put(a_device("SN-2"))
    store.put(a_device("SN-3"))
    await report(internal, connected=True, session="s1", seconds=0, address="10.0.0.7:50060")
    await report(internal, connected=True, session="s2", seconds=0, device="devices/SN-2")
    await report(internal, connected=False, session="s2", seconds=9, device="devices/SN-2")
    channel = peer_channel("device", address=internal_address, caller="command")
    try:
        lookup = GrpcDeviceConnections(channel)
        connected = await lookup.open_connection(DEVICE)
        disconnected = await lookup.open_connection("devices/SN-2")
        never = await lookup.open_connection("devices/SN-3")
        deleted = await lookup.open_connection("devices/gone")
    finally:
        await channel.close()

    assert connected == AdapterConnection("adapter-1", "10.0.0.7:50060")
    assert (disconnected, never, deleted) == (None, None, None)


async def test_the_device_service_reads_connections_from_its_own_stores(
    internal: DeviceInternal, store: InMemoryRepository[Device], statuses: InMemoryStatusStore
) -> None:
    lookup = RepositoryConnections(store, statuses)
    assert await lookup.open_connection(DEVICE) is None

    await report(internal, connected=True, session="s1", seconds=0, address="10.0.0.7:50060")
    assert await lookup.open_connection(DEVICE) == AdapterConnection("adapter-1", "10.0.0.7:50060")

    await report(internal, connected=False, session="s1", seconds=5)
    assert await lookup.open_connection(DEVICE) is None
    assert await lookup.open_connection("devices/gone") is None


# --- a new desired configuration is pushed ----------------------------------------------------------


class RecordingConfigNotifier:
    def __init__(self) -> None:
        self.changed: list[str] = []
        self.failing = False

    async def desired_config_changed(self, device: str) -> None:
        self.changed.append(device)
        if self.failing:
            raise RuntimeError("adapter unreachable")


def device_service(
    store: InMemoryRepository[Device], statuses: InMemoryStatusStore, notifier: DesiredConfigNotifier
) -> DeviceService:
    return DeviceService(
        store,
        FakeOrganizationDirectory({HOME}),
        RecordingAuditTrail("device"),
        configs=InMemoryConfigStore(),
        statuses=statuses,
        notifier=notifier,
    )


async def test_a_changed_desired_configuration_is_notified_an_unchanged_one_is_not(
    store: InMemoryRepository[Device], statuses: InMemoryStatusStore
) -> None:
    notifier = RecordingConfigNotifier()
    service = device_service(store, statuses, notifier)

    with acting_as(OPERATOR):
        await service.update_config(f"{DEVICE}/config", {"rate": 5}, [], "")
        await service.update_config(f"{DEVICE}/config", {"rate": 5}, [], "")  # the same: no new version
        await service.update_config(f"{DEVICE}/config", {"rate": 6}, [], "")

    assert notifier.changed == [DEVICE, DEVICE]


async def test_a_failing_notifier_does_not_fail_the_update(
    store: InMemoryRepository[Device], statuses: InMemoryStatusStore, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = RecordingConfigNotifier()
    notifier.failing = True
    service = device_service(store, statuses, notifier)

    with acting_as(OPERATOR):
        config = await service.update_config(f"{DEVICE}/config", {"rate": 5}, [], "")

    assert config.desired_version == 1
    assert notifier.changed == [DEVICE]
    assert "could not notify devices/SN-1 of its desired configuration" in caplog.text


async def test_the_adapter_holding_the_device_hears_of_its_new_configuration(
    internal: DeviceInternal,
    store: InMemoryRepository[Device],
    statuses: InMemoryStatusStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEDMESH_INTERNAL_TOKEN", MESH_TOKEN)
    adapters = AdapterNotifier(
        RepositoryConnections(store, statuses),
        lambda address: peer_channel("mqtt_adapter", address=address, caller="device"),
    )
    service = device_service(store, statuses, AdapterConfigNotifier(adapters))
    stub: StubAdapter
    try:
        async with serving_stub_adapter(MESH_TOKEN) as (stub, address):
            with acting_as(OPERATOR):
                await service.update_config(f"{DEVICE}/config", {"rate": 4}, [], "")  # not connected yet
            await adapters.wait_idle()
            await report(internal, connected=True, session="s1", seconds=0, address=address)
            with acting_as(OPERATOR):
                await service.update_config(f"{DEVICE}/config", {"rate": 5}, [], "")
            told = await stub.next()
            await adapters.wait_idle()
    finally:
        await adapters.close()

    assert (told.device, told.pending, told.caller) == (DEVICE, (PENDING_CONFIG,), "device")
    assert len(stub.notifications) == 1
