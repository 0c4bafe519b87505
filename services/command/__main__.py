"""Runs the command service: `python -m services.command`."""

from __future__ import annotations

import asyncio

from medmesh.command.v1 import command_service_pb2_grpc as pb_grpc
from medmesh.runtime.adapters import AdapterNotifier, GrpcDeviceConnections
from medmesh.runtime.audit_outbox import OutboxAuditTrail
from medmesh.runtime.clients import peer_channel, service_authenticator
from medmesh.runtime.directories import GrpcDeviceDirectory
from medmesh.runtime.mongo import connect, readiness
from medmesh.runtime.server import ServiceBinding, configure_process, serve
from medmesh.runtime.settings import Settings
from services.command.notifier import AdapterCommandNotifier
from services.command.repository import CommandRepository, SessionRepository
from services.command.service import CommandService
from services.command.servicer import (
    INTERNAL_METHODS,
    INTERNAL_SERVICE,
    CommandInternalServicer,
    CommandServicer,
    command_to_pb,
)
from services.command.sweeper import DeadlineSweeper, stop_task, sweep_seconds_from_env


async def main() -> None:
    settings = Settings.from_env("command")
    configure_process(settings)
    sweep_seconds = sweep_seconds_from_env()
    client, database = connect(settings)
    identity = peer_channel("identity", caller=settings.service)
    devices = peer_channel("device", caller=settings.service)
    audit_channel = peer_channel("audit", caller=settings.service)
    commands = CommandRepository(database)
    sessions = SessionRepository(database)
    # Audit events go to an outbox in this service's own database first; the flusher delivers them.
    trail = OutboxAuditTrail(database, settings.service, audit_channel)
    # A device registered a moment ago can receive commands at once: absences are not cached.
    directory = GrpcDeviceDirectory(devices, cache_absent=False)
    # A connected device hears of a command change from the adapter instance that holds its
    # connection (the device service says which, and at what address); a device that does not
    # gets its commands from the pending list when it connects.
    adapters = AdapterNotifier(
        GrpcDeviceConnections(devices),
        lambda address: peer_channel("mqtt_adapter", address=address, caller=settings.service),
    )
    service = CommandService(commands, sessions, directory, trail, AdapterCommandNotifier(adapters, command_to_pb))
    sweeper = DeadlineSweeper(service, sweep_seconds)
    bindings = [
        ServiceBinding(
            "medmesh.command.v1.CommandService", CommandServicer(service), pb_grpc.add_CommandServiceServicer_to_server
        ),
        ServiceBinding(
            INTERNAL_SERVICE, CommandInternalServicer(service), pb_grpc.add_CommandInternalServiceServicer_to_server
        ),
    ]
    background: dict[str, asyncio.Task[None]] = {}

    async def start() -> None:
        background["trail"] = asyncio.create_task(trail.run())
        # Sweeps at once: a deadline that passed while no instance ran is acted on right away.
        background["sweeper"] = sweeper.start()

    async def stop() -> None:
        # The sweeper first: what it records reaches the outbox before the last flush.
        if "sweeper" in background:
            await stop_task(background["sweeper"])
        # Notifications in flight are hints: cancelled, not waited for.
        await adapters.close()
        await trail.close()
        if "trail" in background:
            await stop_task(background["trail"])
        for channel in (identity, devices, audit_channel):
            await channel.close()
        await client.close()

    await serve(
        settings,
        bindings,
        readiness(database, commands, sessions, trail),
        on_start=start,
        on_stop=stop,
        authenticator=service_authenticator(identity, internal_methods=INTERNAL_METHODS),
    )


if __name__ == "__main__":
    asyncio.run(main())
