"""Runs the organization service: `python -m services.organization`."""

from __future__ import annotations

import asyncio
import os

from medmesh.organization.v1 import organization_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit_outbox import OutboxAuditTrail
from medmesh.runtime.auth import manufacturer_organization_id
from medmesh.runtime.clients import peer_channel, service_authenticator
from medmesh.runtime.mongo import connect, readiness
from medmesh.runtime.server import ServiceBinding, configure_process, serve
from medmesh.runtime.settings import Settings
from services.organization.repository import OrganizationRepository
from services.organization.service import OrganizationService
from services.organization.servicer import OrganizationServicer


async def main() -> None:
    settings = Settings.from_env("organization")
    configure_process(settings)
    client, database = connect(settings)
    identity = peer_channel("identity", caller=settings.service)
    audit_channel = peer_channel("audit", caller=settings.service)
    repository = OrganizationRepository(database)
    trail = OutboxAuditTrail(database, settings.service, audit_channel)
    service = OrganizationService(repository, trail, manufacturer_organization_id())
    binding = ServiceBinding(
        "medmesh.organization.v1.OrganizationService",
        OrganizationServicer(service),
        pb_grpc.add_OrganizationServiceServicer_to_server,
    )
    manufacturer_name = os.environ.get("MEDMESH_MANUFACTURER_NAME", "").strip() or "Manufacturer"
    ready = readiness(database, repository, trail, setup=[lambda: service.ensure_manufacturer(manufacturer_name)])
    background: list[asyncio.Task[None]] = []

    async def start() -> None:
        background.append(asyncio.create_task(trail.run()))

    async def stop() -> None:
        await trail.close()
        for channel in (identity, audit_channel):
            await channel.close()
        await client.close()

    await serve(
        settings,
        [binding],
        ready,
        on_start=start,
        on_stop=stop,
        authenticator=service_authenticator(identity),
    )


if __name__ == "__main__":
    asyncio.run(main())
