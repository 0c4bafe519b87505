"""Runs the device registry service: `python -m services.device`."""

from __future__ import annotations

import asyncio

from medmesh.device.v1 import device_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit_outbox import OutboxAuditTrail
from medmesh.runtime.clients import peer_channel, service_authenticator
from medmesh.runtime.mongo import connect, readiness
from medmesh.runtime.server import ServiceBinding, configure_process, serve
from medmesh.runtime.settings import Settings
from services.device.organizations import GrpcOrganizationDirectory
from services.device.repository import DeviceRepository
from services.device.service import DeviceService
from services.device.servicer import DeviceServicer


async def main() -> None:
    settings = Settings.from_env("device")
    configure_process(settings)
    client, database = connect(settings)
    organizations = peer_channel("organization", caller=settings.service)
    identity = peer_channel("identity", caller=settings.service)
    audit_channel = peer_channel("audit", caller=settings.service)
    repository = DeviceRepository(database)
    trail = OutboxAuditTrail(database, settings.service, audit_channel)
    service = DeviceService(repository, GrpcOrganizationDirectory(organizations), trail)
    binding = ServiceBinding(
        "medmesh.device.v1.DeviceService", DeviceServicer(service), pb_grpc.add_DeviceServiceServicer_to_server
    )
    background: list[asyncio.Task[None]] = []

    async def start() -> None:
        background.append(asyncio.create_task(trail.run()))

    async def close() -> None:
        await trail.close()
        for channel in (organizations, identity, audit_channel):
            await channel.close()
        await client.close()

    await serve(
        settings,
        [binding],
        readiness(database, repository, trail),
        on_start=start,
        on_stop=close,
        authenticator=service_authenticator(identity),
    )


if __name__ == "__main__":
    asyncio.run(main())
