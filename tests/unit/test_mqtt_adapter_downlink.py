"""Deliveries: a command pushed to a device is marked DELIVERED after a short grace, unless the
device's own status report (which implies delivery) came first."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from medmesh.command.v1 import command_service_pb2 as command_pb
from mqtt_adapter.downlink import Deliveries
from mqtt_adapter.topics import Downlink

DEVICE = "devices/SN-1"
NAME = f"{DEVICE}/commands/c-1"


class Acknowledging:
    """Connections whose device acknowledges every publish at once."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Downlink]] = []

    def publish(self, device: str, topic: Downlink, payload: bytes) -> list[asyncio.Task[None]]:
        self.published.append((device, topic))

        async def acknowledged() -> None:
            return None

        return [asyncio.ensure_future(acknowledged())]


class Commands:
    def __init__(self) -> None:
        self.marked: list[str] = []

    async def mark_delivered(self, name: str) -> None:
        self.marked.append(name)


class FakeMesh:
    def __init__(self) -> None:
        self.commands = Commands()


async def pushed(reported_after: float | None) -> list[str]:
    mesh = FakeMesh()
    deliveries = Deliveries(cast(Any, mesh), cast(Any, Acknowledging()), report_grace=0.05)
    command = command_pb.Command(name=NAME, command_name="reboot")
    deliveries.push_commands(DEVICE, [command])
    if reported_after is not None:
        await asyncio.sleep(reported_after)
        deliveries.reported(NAME)
    await asyncio.sleep(0.15)
    await deliveries.close()
    return mesh.commands.marked


async def test_a_command_the_device_does_not_answer_is_marked_delivered() -> None:
    assert await pushed(reported_after=None) == [NAME]


async def test_a_status_report_within_the_grace_stands_for_the_delivery() -> None:
    assert await pushed(reported_after=0.01) == []


async def test_a_status_report_after_the_grace_changes_nothing() -> None:
    assert await pushed(reported_after=0.1) == [NAME]
