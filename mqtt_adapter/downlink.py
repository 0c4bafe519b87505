"""Cloud -> device: desired configuration and commands, asked from their source of truth.

A delivery is triggered when a device subscribes to the topic (it is connected and ready), and
when a service notifies this instance (`AdapterInternalService.NotifyDevice`). It asks the
device or command service what is pending, so a lost or repeated notification is harmless;
only commands just created may come with the notification, and are published as they are.
Deliveries for one device and kind are coalesced: a notification that arrives while one runs
makes it run once more, never twice at once. A command the device acknowledged is marked
DELIVERED `REPORT_GRACE_SECONDS` later, unless the device reported its status first.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum

import grpc

from medmesh.command.v1 import command_service_pb2 as command_pb
from medmesh.mqttadapter.v1 import adapter_internal_service_pb2 as adapter_pb
from medmesh.runtime.tasks import BackgroundTasks
from mqtt_adapter.connections import Connections
from mqtt_adapter.mesh import Mesh
from mqtt_adapter.payloads import command_payload, desired_config_payload
from mqtt_adapter.topics import Downlink

log = logging.getLogger(__name__)


class Kind(Enum):
    CONFIG = Downlink.CONFIG_DESIRED
    COMMANDS = Downlink.COMMANDS


KIND_OF_PENDING = {adapter_pb.PENDING_CONFIG: Kind.CONFIG, adapter_pb.PENDING_COMMANDS: Kind.COMMANDS}


# A command is marked DELIVERED this long after the device acknowledged it, unless the device's
# own status report (which implies delivery) came first: a device that answers at once then
# costs one change of the command instead of two racing each other.
REPORT_GRACE_SECONDS = 0.25
MAX_REMEMBERED_REPORTS = 10_000


class Deliveries:
    def __init__(self, mesh: Mesh, connections: Connections, *, report_grace: float = REPORT_GRACE_SECONDS) -> None:
        self._mesh = mesh
        self._connections = connections
        self._running: dict[tuple[str, Kind], asyncio.Task[None]] = {}
        self._again: set[tuple[str, Kind]] = set()
        self._pushes = BackgroundTasks()
        self._report_grace = report_grace
        self._reported: OrderedDict[str, None] = OrderedDict()  # commands whose status came in lately

    def request(self, device: str, kind: Kind) -> None:
        """Delivers what is pending of `kind` to the device's connections here, soon."""
        key = (device, kind)
        if key in self._running:
            self._again.add(key)
            return
        task = asyncio.create_task(self._run(key))
        self._running[key] = task

    async def _run(self, key: tuple[str, Kind]) -> None:
        device, kind = key
        deliver: Callable[[str], Awaitable[None]] = self._config if kind is Kind.CONFIG else self._commands
        try:
            while True:
                self._again.discard(key)
                if not self._connections.holds(device):
                    return
                try:
                    await deliver(device)
                except grpc.aio.AioRpcError as error:
                    # The device gets it on its next subscribe, or with the next notification.
                    log.warning("could not deliver %s to %s: %s", kind.name.lower(), device, error.code())
                if key not in self._again:
                    return
        finally:
            del self._running[key]

    def push_commands(self, device: str, commands: Sequence[command_pb.Command]) -> None:
        """Publishes commands just created, as they came with the notification, without listing."""
        self._pushes.spawn(self._run_commands(device, commands))

    def reported(self, name: str) -> None:
        """The command service took a status report of command `name` from its device."""
        self._reported[name] = None
        if len(self._reported) > MAX_REMEMBERED_REPORTS:
            self._reported.popitem(last=False)

    async def _run_commands(self, device: str, commands: Sequence[command_pb.Command]) -> None:
        for command in commands:
            sent = await _settled(self._connections.publish(device, Downlink.COMMANDS, command_payload("run", command)))
            if sent:
                self._pushes.spawn(self._mark_delivered(command.name))

    async def _mark_delivered(self, name: str) -> None:
        await asyncio.sleep(self._report_grace)
        if name in self._reported:
            del self._reported[name]
            return  # its report came first, and said as much
        try:
            await self._mesh.commands.mark_delivered(name)
        except grpc.aio.AioRpcError as error:
            # Over meanwhile (canceled, expired): the next listing tells the device to drop it.
            log.info("%s not marked delivered: %s", name, error.details())

    async def _config(self, device: str) -> None:
        pending = await self._mesh.registry.pending_config(device)
        if pending.desired_version:
            payload = desired_config_payload(pending.desired_version, pending.desired)
            await _settled(self._connections.publish(device, Downlink.CONFIG_DESIRED, payload))

    async def _commands(self, device: str) -> None:
        reply = await self._mesh.commands.pending(device)
        await self._run_commands(device, reply.commands)
        for action, commands in (("stop", reply.stop_requests), ("cancel", reply.cancellations)):
            for command in commands:
                self._connections.publish(device, Downlink.COMMANDS, command_payload(action, command))

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), self._pushes.close(), return_exceptions=True)


async def _settled(tasks: list[asyncio.Task[None]]) -> bool:
    """True when at least one connection acknowledged the publish."""
    if not tasks:
        return False
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return any(result is None for result in results)
