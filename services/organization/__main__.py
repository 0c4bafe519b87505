"""Runs the organization service: `python -m services.organization`."""

from __future__ import annotations

import asyncio

from medmesh.organization.v1 import organization_service_pb2_grpc as pb_grpc
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
    repository = OrganizationRepository(database)
    binding = ServiceBinding(
        "medmesh.organization.v1.OrganizationService",
        OrganizationServicer(OrganizationService(repository)),
        pb_grpc.add_OrganizationServiceServicer_to_server,
    )
    await serve(settings, [binding], readiness(database, repository), on_stop=client.close)


if __name__ == "__main__":
    asyncio.run(main())
