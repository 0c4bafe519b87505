"""Runs the device registry service: `python -m services.device`."""

from __future__ import annotations

import asyncio

from medmesh.device.v1 import device_service_pb2_grpc as pb_grpc
from medmesh.runtime.clients import peer_channel
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
    organizations = peer_channel("organization")
    repository = DeviceRepository(database)
    service = DeviceService(repository, GrpcOrganizationDirectory(organizations))
    binding = ServiceBinding(
        "medmesh.device.v1.DeviceService", DeviceServicer(service), pb_grpc.add_DeviceServiceServicer_to_server
    )

    async def close() -> None:
        await organizations.close()
        await client.close()

    await serve(settings, [binding], readiness(database, repository), on_stop=close)


if __name__ == "__main__":
    asyncio.run(main())
