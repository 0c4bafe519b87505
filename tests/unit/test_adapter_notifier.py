"""AdapterNotifier: telling the adapter instance that holds a device's connection what is pending,
best effort, over real gRPC to a stub of the adapter's internal API with the mesh credential; and
the command service's notifier built on it."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import grpc
import pytest

from medmesh.runtime.adapters import (
    PENDING_COMMANDS,
    PENDING_CONFIG,
    AdapterConnection,
    AdapterNotifier,
)
from medmesh.runtime.clients import peer_channel
from medmesh.runtime.resources import now
from services.command.domain import CommandRequest, CommandState, new_command
from services.command.notifier import AdapterCommandNotifier
from services.command.servicer import command_to_pb
from tests.unit.adapter_stub import StubAdapter, serving_stub_adapter

MESH_TOKEN = "adapter-notifier-test-credential"
DEVICE = "devices/SN-1"


class FakeConnections:
    """The device service's view of connections: device -> the adapter holding it."""

    def __init__(self) -> None:
        self.connections: dict[str, AdapterConnection] = {}
        self.failing = False
        self.asked: list[str] = []

    async def open_connection(self, device: str) -> AdapterConnection | None:
        self.asked.append(device)
        if self.failing:
            raise RuntimeError("device service unavailable")
        return self.connections.get(device)


class CountingDial:
    """`peer_channel("mqtt_adapter", ...)`, counting the channels made and closed."""

    def __init__(self) -> None:
        self.dialled: list[str] = []
        self.channels: list[grpc.aio.Channel] = []

    def __call__(self, address: str) -> grpc.aio.Channel:
        self.dialled.append(address)
        channel = peer_channel("mqtt_adapter", address=address, caller="command")
        self.channels.append(channel)
        return channel


@pytest.fixture
def mesh_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMESH_INTERNAL_TOKEN", MESH_TOKEN)


@pytest.fixture
async def adapter(mesh_credential: None) -> AsyncIterator[tuple[StubAdapter, str]]:
    async with serving_stub_adapter(MESH_TOKEN) as served:
        yield served


@pytest.fixture
def connections() -> FakeConnections:
    return FakeConnections()


@pytest.fixture
def dial() -> CountingDial:
    return CountingDial()


@pytest.fixture
async def notifier(connections: FakeConnections, dial: CountingDial) -> AsyncIterator[AdapterNotifier]:
    notifier = AdapterNotifier(connections, dial, timeout=0.5)
    try:
        yield notifier
    finally:
        await notifier.close()


def connect(connections: FakeConnections, address: str, device: str = DEVICE) -> None:
    connections.connections[device] = AdapterConnection("adapter-1", address)


def unused_address() -> str:
    """A port nothing listens on: an adapter pod that is gone."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


# --- notify: now ---------------------------------------------------------------------------------


async def test_the_adapter_holding_the_connection_is_told_with_the_mesh_credential(
    adapter: tuple[StubAdapter, str], connections: FakeConnections, notifier: AdapterNotifier
) -> None:
    stub, address = adapter
    connect(connections, address)

    assert await notifier.notify(DEVICE, [PENDING_COMMANDS, PENDING_CONFIG, PENDING_CONFIG]) is True

    [told] = stub.notifications
    # The stub's interceptor refuses calls without the credential: arriving at all proves it.
    assert (told.device, told.caller) == (DEVICE, "command")
    assert told.pending == (PENDING_CONFIG, PENDING_COMMANDS)  # each once, as the adapter requires


async def test_the_wrong_mesh_credential_is_refused_and_only_logged(
    adapter: tuple[StubAdapter, str],
    connections: FakeConnections,
    notifier: AdapterNotifier,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub, address = adapter
    connect(connections, address)
    monkeypatch.setenv("MEDMESH_INTERNAL_TOKEN", "not-the-mesh-credential")

    with caplog.at_level(logging.WARNING, "medmesh.runtime.adapters"):
        assert await notifier.notify(DEVICE, [PENDING_CONFIG]) is False

    assert stub.notifications == []
    assert "UNAUTHENTICATED" in caplog.text


async def test_nothing_is_sent_for_a_device_that_is_not_connected(
    adapter: tuple[StubAdapter, str], connections: FakeConnections, dial: CountingDial, notifier: AdapterNotifier
) -> None:
    stub, _ = adapter

    assert await notifier.notify(DEVICE, [PENDING_CONFIG]) is False

    assert connections.asked == [DEVICE]
    assert dial.dialled == []
    assert stub.notifications == []


async def test_nothing_is_sent_when_the_adapter_reported_no_address(
    connections: FakeConnections, dial: CountingDial, notifier: AdapterNotifier
) -> None:
    connect(connections, "")

    assert await notifier.notify(DEVICE, [PENDING_CONFIG]) is False
    assert dial.dialled == []


async def test_a_stale_connection_is_not_an_error(
    adapter: tuple[StubAdapter, str],
    connections: FakeConnections,
    notifier: AdapterNotifier,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub, address = adapter
    stub.connected = False  # the device moved to another adapter a moment ago
    connect(connections, address)

    with caplog.at_level(logging.WARNING, "medmesh.runtime.adapters"):
        assert await notifier.notify(DEVICE, [PENDING_CONFIG]) is False

    assert len(stub.notifications) == 1
    assert caplog.records == []


async def test_the_adapter_that_took_the_last_notification_is_told_without_a_lookup(
    adapter: tuple[StubAdapter, str], connections: FakeConnections, notifier: AdapterNotifier
) -> None:
    stub, address = adapter
    connect(connections, address)

    assert await notifier.notify(DEVICE, [PENDING_CONFIG])
    assert await notifier.notify(DEVICE, [PENDING_COMMANDS])

    assert connections.asked == [DEVICE]
    assert len(stub.notifications) == 2


async def test_a_device_that_moved_is_looked_up_again_and_told_where_it_is(
    mesh_credential: None, connections: FakeConnections, notifier: AdapterNotifier
) -> None:
    async with (
        serving_stub_adapter(MESH_TOKEN) as (old, old_address),
        serving_stub_adapter(MESH_TOKEN) as (new, new_address),
    ):
        connect(connections, old_address)
        assert await notifier.notify(DEVICE, [PENDING_CONFIG])
        old.connected = False  # the device reconnected to the other instance
        connect(connections, new_address)

        assert await notifier.notify(DEVICE, [PENDING_COMMANDS])

        assert connections.asked == [DEVICE, DEVICE]
        assert len(old.notifications) == 2
        assert len(new.notifications) == 1


async def test_a_failing_lookup_is_logged_not_raised(
    connections: FakeConnections, notifier: AdapterNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    connections.failing = True

    with caplog.at_level(logging.WARNING, "medmesh.runtime.adapters"):
        assert await notifier.notify(DEVICE, [PENDING_CONFIG]) is False

    assert "could not look up the connection of devices/SN-1" in caplog.text


async def test_an_adapter_that_is_gone_costs_at_most_the_timeout(
    mesh_credential: None,
    connections: FakeConnections,
    dial: CountingDial,
    notifier: AdapterNotifier,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gone = unused_address()
    connect(connections, gone)

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "medmesh.runtime.adapters"):
        assert await notifier.notify(DEVICE, [PENDING_CONFIG]) is False
        assert await notifier.notify(DEVICE, [PENDING_CONFIG]) is False
    elapsed = time.monotonic() - started

    assert elapsed < 2 * 0.5 + 0.5
    assert caplog.text.count(f"could not notify devices/SN-1 at adapter adapter-1 ({gone})") == 2
    # The dead address's channel is not kept: the next notification dials afresh.
    assert dial.dialled == [gone, gone]


async def test_a_stuck_adapter_times_out(
    adapter: tuple[StubAdapter, str], connections: FakeConnections, notifier: AdapterNotifier
) -> None:
    stub, address = adapter
    stub.hold.clear()
    connect(connections, address)

    started = time.monotonic()
    assert await notifier.notify(DEVICE, [PENDING_CONFIG]) is False
    assert 0.4 < time.monotonic() - started < 1.0


async def test_one_channel_per_adapter_address_is_kept(
    adapter: tuple[StubAdapter, str], connections: FakeConnections, dial: CountingDial, notifier: AdapterNotifier
) -> None:
    stub, address = adapter
    connect(connections, address)
    connect(connections, address, "devices/SN-2")

    for device in (DEVICE, "devices/SN-2", DEVICE):
        assert await notifier.notify(device, [PENDING_COMMANDS])

    assert dial.dialled == [address]
    assert len(stub.notifications) == 3


async def test_channels_to_the_least_recently_notified_adapters_are_closed(
    mesh_credential: None, connections: FakeConnections, dial: CountingDial
) -> None:
    notifier = AdapterNotifier(connections, dial, timeout=0.5, max_channels=1)
    async with (
        serving_stub_adapter(MESH_TOKEN) as (first, first_address),
        serving_stub_adapter(MESH_TOKEN) as (second, second_address),
    ):
        connect(connections, first_address)
        connect(connections, second_address, "devices/SN-2")
        assert await notifier.notify(DEVICE, [PENDING_CONFIG])
        assert await notifier.notify("devices/SN-2", [PENDING_CONFIG])
        await notifier.wait_idle()
        assert await notifier.notify(DEVICE, [PENDING_CONFIG])
        await notifier.close()

    assert dial.dialled == [first_address, second_address, first_address]
    assert (len(first.notifications), len(second.notifications)) == (2, 1)
    # Evicted and closed ones, then the rest on close: a closed channel cannot start a call.
    for channel in dial.channels:
        with pytest.raises(grpc.aio.UsageError):
            await channel.channel_ready()


# --- notify_soon: in the background --------------------------------------------------------------


async def test_notify_soon_returns_before_the_adapter_answers(
    adapter: tuple[StubAdapter, str], connections: FakeConnections, notifier: AdapterNotifier
) -> None:
    stub, address = adapter
    stub.hold.clear()
    connect(connections, address)

    started = time.monotonic()
    notifier.notify_soon(DEVICE, PENDING_CONFIG)
    returned = time.monotonic() - started
    told = await stub.next()
    stub.hold.set()
    await notifier.wait_idle()

    assert returned < 0.01
    assert told.pending == (PENDING_CONFIG,)


async def test_changes_during_a_notification_are_sent_once_after_it(
    adapter: tuple[StubAdapter, str], connections: FakeConnections, notifier: AdapterNotifier
) -> None:
    stub, address = adapter
    stub.hold.clear()
    connect(connections, address)

    notifier.notify_soon(DEVICE, PENDING_COMMANDS)
    await stub.next()  # in flight; the adapter may have read the pending lists already
    notifier.notify_soon(DEVICE, PENDING_COMMANDS)
    notifier.notify_soon(DEVICE, PENDING_CONFIG)
    notifier.notify_soon(DEVICE, PENDING_COMMANDS)
    stub.hold.set()
    await notifier.wait_idle()

    assert [n.pending for n in stub.notifications] == [(PENDING_COMMANDS,), (PENDING_CONFIG, PENDING_COMMANDS)]


async def test_devices_are_notified_independently(
    adapter: tuple[StubAdapter, str], connections: FakeConnections, notifier: AdapterNotifier
) -> None:
    stub, address = adapter
    stub.hold.clear()
    for serial in ("SN-1", "SN-2", "SN-3"):
        connect(connections, address, f"devices/{serial}")

    for serial in ("SN-1", "SN-2", "SN-3"):
        notifier.notify_soon(f"devices/{serial}", PENDING_CONFIG)
    # All three in flight at once: one slow device does not hold up the others.
    arrived = {(await stub.next()).device for _ in range(3)}
    stub.hold.set()
    await notifier.wait_idle()

    assert arrived == {"devices/SN-1", "devices/SN-2", "devices/SN-3"}


async def test_too_many_waiting_devices_are_dropped_with_a_warning(
    adapter: tuple[StubAdapter, str],
    connections: FakeConnections,
    dial: CountingDial,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub, address = adapter
    stub.hold.clear()
    connect(connections, address)
    connect(connections, address, "devices/SN-2")
    notifier = AdapterNotifier(connections, dial, timeout=0.5, max_queued_devices=1)

    with caplog.at_level(logging.WARNING, "medmesh.runtime.adapters"):
        notifier.notify_soon(DEVICE, PENDING_CONFIG)
        notifier.notify_soon("devices/SN-2", PENDING_CONFIG)
    await stub.next()
    stub.hold.set()
    await notifier.wait_idle()
    await notifier.close()

    assert [n.device for n in stub.notifications] == [DEVICE]
    assert "not notifying devices/SN-2: 1 devices are waiting" in caplog.text


async def test_close_cancels_notifications_in_flight_and_leaks_no_task(
    adapter: tuple[StubAdapter, str], connections: FakeConnections, dial: CountingDial
) -> None:
    stub, address = adapter
    stub.hold.clear()  # the adapter never answers
    connect(connections, address)
    notifier = AdapterNotifier(connections, dial, timeout=5.0)
    before = asyncio.all_tasks()

    notifier.notify_soon(DEVICE, PENDING_CONFIG)
    await stub.next()
    started = time.monotonic()
    await notifier.close()
    notifier.notify_soon(DEVICE, PENDING_CONFIG)  # after close: nothing

    assert time.monotonic() - started < 1.0  # not the 5 s timeout
    # The stub server's own handler is still waiting; none of the notifier's tasks is.
    ours = [t for t in asyncio.all_tasks() - before if t.get_name().startswith(("notify ", "close adapter channel"))]
    assert ours == []
    assert len(stub.notifications) == 1


# --- the command service's notifier --------------------------------------------------------------


async def test_a_command_change_notifies_pending_commands_without_waiting(
    adapter: tuple[StubAdapter, str], connections: FakeConnections, notifier: AdapterNotifier
) -> None:
    stub, address = adapter
    stub.hold.clear()
    connect(connections, address)
    command = new_command(
        "SN-1", "organizations/a", CommandRequest("reboot", ttl=timedelta(minutes=5)), "organizations/a/users/u", now()
    )

    started = time.monotonic()
    await AdapterCommandNotifier(notifier, command_to_pb).command_changed(command)
    returned = time.monotonic() - started
    told = await stub.next()
    stub.hold.set()
    await notifier.wait_idle()

    assert returned < 0.01
    assert (told.device, told.pending) == (DEVICE, (PENDING_COMMANDS,))
    # Just created: the command itself comes along, for the adapter to publish without listing.
    assert told.commands == (command.name,)


async def test_a_later_change_of_a_command_only_says_commands_are_pending(
    adapter: tuple[StubAdapter, str], connections: FakeConnections, notifier: AdapterNotifier
) -> None:
    stub, _ = adapter
    connect(connections, adapter[1])
    command = new_command(
        "SN-1", "organizations/a", CommandRequest("reboot", ttl=timedelta(minutes=5)), "organizations/a/users/u", now()
    )
    canceled = replace(command, state=CommandState.CANCELED, revision=2)

    await AdapterCommandNotifier(notifier, command_to_pb).command_changed(canceled)
    told = await stub.next()
    await notifier.wait_idle()

    assert (told.pending, told.commands) == ((PENDING_COMMANDS,), ())
