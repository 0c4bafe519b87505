"""Pushing to a connected device in real time: services tell the MQTT adapter instance that holds
a device's connection that something is pending for it (`AdapterInternalService.NotifyDevice`).

A notification carries no data and is a hint, never the delivery: the adapter asks the source of
truth (the device service for configuration, the command service for commands) what is pending,
and a device that was not told gets everything when it next connects. So notifying is best
effort: a failure is logged at warning and never fails the caller's request.

Which adapter holds the connection, and its address, comes from the device service
(`DeviceInternalService.GetDeviceConnection`); the device service itself reads its own
repository. Adapters are reached at their own instance's address (a pod IP), not through a
Service, so each address gets a channel of its own, kept for the next notification.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from medmesh.device.v1 import device_internal_service_pb2 as device_pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as device_pb_grpc
from medmesh.mqttadapter.v1 import adapter_internal_service_pb2 as adapter_pb
from medmesh.mqttadapter.v1 import adapter_internal_service_pb2_grpc as adapter_pb_grpc
from medmesh.runtime.tasks import stop_requested

log = logging.getLogger(__name__)

Pending = adapter_pb.Pending
PENDING_CONFIG: Pending = adapter_pb.PENDING_CONFIG
PENDING_COMMANDS: Pending = adapter_pb.PENDING_COMMANDS

# A connected device is told within ~100 ms; a call that takes this long is to an adapter that is
# gone or stuck, and the device will get what is pending when it reconnects anyway.
NOTIFY_TIMEOUT_SECONDS = 1.0
# Adapter instances come and go (pod IPs): channels to the least recently notified are closed.
MAX_CHANNELS = 256
# Devices with a notification waiting or in flight; beyond this, new ones are dropped (logged):
# an adapter that cannot keep up must not make the caller's memory grow without bound.
MAX_QUEUED_DEVICES = 10_000
# Commands one notification carries at most (NotifyDeviceRequest's limit); the adapter lists the rest.
MAX_PUSHED_COMMANDS = 100
# Where a device was last told something is kept this long, so the next notification skips the
# lookup (a command round trip's first hop). Safe: an adapter that no longer holds the device
# answers `connected: false`, and then the device service is asked again at once.
KNOWN_CONNECTION_SECONDS = 30.0
MAX_KNOWN_CONNECTIONS = 10_000


@dataclass(frozen=True)
class AdapterConnection:
    """The adapter instance that holds a device's open connection."""

    adapter_instance: str
    adapter_address: str  # host:port of its AdapterInternalService; "" if it reported none


class ConnectionLookup(Protocol):
    async def open_connection(self, device: str) -> AdapterConnection | None:
        """The adapter holding `device`'s open connection; None if it is not connected or unknown."""


class GrpcDeviceConnections:
    """ConnectionLookup over the device service's `GetDeviceConnection` (with the mesh credential
    the channel adds)."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = NOTIFY_TIMEOUT_SECONDS) -> None:
        self._stub = device_pb_grpc.DeviceInternalServiceStub(channel)
        self._timeout = timeout

    async def open_connection(self, device: str) -> AdapterConnection | None:
        try:
            reply = await self._stub.GetDeviceConnection(
                device_pb.GetDeviceConnectionRequest(device=device), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:  # deleted meanwhile: nobody to tell
                return None
            raise
        if not reply.connected:
            return None
        return AdapterConnection(reply.adapter_instance, reply.adapter_address)


# address -> a channel to it; `peer_channel("mqtt_adapter", address=..., caller=...)` in services,
# so the mesh credential and tracing are attached (and the manifests' scan sees who calls it).
Dial = Callable[[str], grpc.aio.Channel]


@dataclass
class _Round:
    """What one notification of a device carries: kinds pending, and commands to publish as they are."""

    pending: set[Pending] = field(default_factory=set)
    commands: list[Any] = field(default_factory=list)

    def add(self, pending: Iterable[Pending], commands: Sequence[Any]) -> None:
        self.pending.update(pending)
        self.commands.extend(commands)
        del self.commands[:-MAX_PUSHED_COMMANDS]  # the adapter lists what does not fit


class AdapterNotifier:
    """Tells the adapter that holds a device's connection what is pending for the device.

    `notify` does it now and reports whether a connected device was told; `notify_soon` does it
    in the background, so a request is not held up by it: notifications for one device that
    arrive while one is in flight are merged and sent once it returns (the adapter may have read
    the pending list before the newer change was written). `close` cancels what is in flight and
    closes the channels.
    """

    def __init__(
        self,
        connections: ConnectionLookup,
        dial: Dial,
        *,
        timeout: float = NOTIFY_TIMEOUT_SECONDS,
        max_channels: int = MAX_CHANNELS,
        max_queued_devices: int = MAX_QUEUED_DEVICES,
    ) -> None:
        self._connections = connections
        self._dial = dial
        self._timeout = timeout
        self._max_channels = max_channels
        self._max_queued = max_queued_devices
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        # device -> what to send in its next round; present while its task runs.
        self._queued: dict[str, _Round] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()  # channels being closed: awaited, never cancelled
        self._closed = False
        # device -> (when, the adapter that took its last notification); see KNOWN_CONNECTION_SECONDS
        self._known: OrderedDict[str, tuple[float, AdapterConnection]] = OrderedDict()

    async def notify(self, device: str, pending: Iterable[Pending], commands: Sequence[Any] = ()) -> bool:
        """True if the adapter holding the device's connection took the notification; False if the
        device is not connected or anything failed (logged). Never raises but CancelledError.

        `commands`, just created (`medmesh.command.v1.Command`), are published by the adapter
        without it asking the command service what is pending."""
        kinds = sorted(set(pending))
        if not kinds or self._closed:
            return False
        known = self._known_connection(device)
        if known is not None and await self._tell(device, known, kinds, commands):
            return True
        # Not known, or it moved, disconnected, or its adapter is gone: ask where it is now.
        try:
            connection = await self._connections.open_connection(device)
        except Exception:  # a hint only: the device gets what is pending when it connects
            log.warning("could not look up the connection of %s to notify it", device, exc_info=True)
            return False
        if connection is None:
            return False
        if not connection.adapter_address:
            log.debug("%s is connected to %s, which reported no address", device, connection.adapter_instance)
            return False
        return await self._tell(device, connection, kinds, commands)

    def _known_connection(self, device: str) -> AdapterConnection | None:
        entry = self._known.pop(device, None)  # taken out: put back only if it still holds
        if entry is None or time.monotonic() - entry[0] > KNOWN_CONNECTION_SECONDS:
            return None
        return entry[1]

    async def _tell(
        self, device: str, connection: AdapterConnection, kinds: list[Pending], commands: Sequence[Any]
    ) -> bool:
        stub = adapter_pb_grpc.AdapterInternalServiceStub(self._channel(connection.adapter_address))
        try:
            reply = await stub.NotifyDevice(
                adapter_pb.NotifyDeviceRequest(device=device, pending=kinds, commands=commands), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            log.warning(
                "could not notify %s at adapter %s (%s): %s %s",
                device,
                connection.adapter_instance,
                connection.adapter_address,
                error.code().name,
                error.details(),
            )
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                # Most likely the instance is gone (its pod IP may be reused by anyone): reconnect
                # afresh next time rather than keep a channel retrying a dead address.
                self._forget(connection.adapter_address)
            return False
        if not reply.connected:
            # The device moved or disconnected since its connection was read.
            log.debug("%s is no longer connected to %s", device, connection.adapter_instance)
            return False
        self._known[device] = (time.monotonic(), connection)
        if len(self._known) > MAX_KNOWN_CONNECTIONS:
            self._known.popitem(last=False)
        return True

    def notify_soon(self, device: str, *pending: Pending, commands: Sequence[Any] = ()) -> None:
        """Like `notify`, in the background; returns at once."""
        if self._closed or not pending:
            return
        queued = self._queued.get(device)
        if queued is not None:
            queued.add(pending, commands)  # the device's task sends it in its next round
            return
        if len(self._queued) >= self._max_queued:
            log.warning("not notifying %s: %d devices are waiting for their adapters", device, len(self._queued))
            return
        self._queued[device] = _Round()
        self._queued[device].add(pending, commands)
        task = asyncio.create_task(self._drain(device), name=f"notify {device}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, device: str) -> None:
        try:
            while not stop_requested() and (round_ := self._queued.get(device)) and round_.pending:
                self._queued[device] = _Round()  # what arrives during this round goes in the next one
                await self.notify(device, round_.pending, round_.commands)
        except Exception:  # notify logs its own failures; this is a bug, and must not go unseen
            log.exception("notifying %s failed", device)
        finally:
            self._queued.pop(device, None)

    async def wait_idle(self) -> None:
        """Until every background notification (and those it causes) has finished."""
        while self._tasks or self._closing:
            await asyncio.gather(*self._tasks, *self._closing, return_exceptions=True)

    async def close(self) -> None:
        """Cancels the background notifications and closes the channels."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a library that swallows the cancellation must not hang shutdown.
            await asyncio.wait(tasks, timeout=self._timeout)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        channels = list(self._channels.values())
        self._channels.clear()
        for channel in channels:
            await channel.close(grace=None)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is not None:
            self._channels.move_to_end(address)
            return channel
        channel = self._dial(address)
        self._channels[address] = channel
        while len(self._channels) > self._max_channels:
            _, oldest = self._channels.popitem(last=False)
            self._close_later(oldest)
        return channel

    def _forget(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            self._close_later(channel)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        # A grace period: another notification may be using the channel right now.
        task = asyncio.create_task(channel.close(grace=self._timeout), name="close adapter channel")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
