"""Runs the device service: `python -m services.device`.

One process serves the registry (with configuration twin and status), the certificates and
temporary credentials, and the internal methods the MQTT adapter and the other services call.
"""

from __future__ import annotations

import asyncio
import contextlib

from medmesh.device.v1 import device_internal_service_pb2_grpc as internal_pb_grpc
from medmesh.device.v1 import device_service_pb2_grpc as pb_grpc
from medmesh.runtime.adapters import AdapterNotifier
from medmesh.runtime.audit_outbox import OutboxAuditTrail
from medmesh.runtime.clients import peer_channel, service_authenticator
from medmesh.runtime.directories import GrpcOrganizationDirectory
from medmesh.runtime.mongo import connect, readiness
from medmesh.runtime.server import ServiceBinding, configure_process, serve
from medmesh.runtime.settings import Settings
from services.device.certificates import DeviceAssignment
from services.device.credential_servicer import wire_credentials
from services.device.domain import parse_name
from services.device.internal import DeviceInternal
from services.device.internal_servicer import INTERNAL_METHODS, DeviceInternalServicer
from services.device.notifier import AdapterConfigNotifier, RepositoryConnections
from services.device.patients import GrpcPatientDirectory
from services.device.repository import ConfigRepository, DeviceRepository, StatusRepository
from services.device.service import DeviceService
from services.device.servicer import DeviceServicer


class RepositoryDeviceRegistry:
    """The registry as the certificate and credential use cases see it: read from the same database."""

    def __init__(self, devices: DeviceRepository) -> None:
        self._devices = devices

    async def get_assignment(self, device: str) -> DeviceAssignment | None:
        found = await self._devices.get(parse_name(device))
        if found is None:
            return None
        return DeviceAssignment(
            found.name, found.organization, found.care_organization, found.patient, registration=found.uid
        )


async def main() -> None:
    settings = Settings.from_env("device")
    configure_process(settings)
    client, database = connect(settings)
    organizations = peer_channel("organization", caller=settings.service)
    patients = peer_channel("patient", caller=settings.service)
    identity = peer_channel("identity", caller=settings.service)
    audit_channel = peer_channel("audit", caller=settings.service)
    repository = DeviceRepository(database)
    configs = ConfigRepository(database)
    statuses = StatusRepository(database)
    trail = OutboxAuditTrail(database, settings.service, audit_channel)
    # A connected device hears of a new desired configuration from the adapter instance that holds
    # its connection, dialled at the address that instance reported.
    adapters = AdapterNotifier(
        RepositoryConnections(repository, statuses),
        lambda address: peer_channel("mqtt_adapter", address=address, caller=settings.service),
    )
    service = DeviceService(
        repository,
        GrpcOrganizationDirectory(organizations),
        trail,
        patients=GrpcPatientDirectory(patients),
        configs=configs,
        statuses=statuses,
        notifier=AdapterConfigNotifier(adapters),
    )
    credentials = wire_credentials(database, settings, RepositoryDeviceRegistry(repository), trail)
    bindings = [
        ServiceBinding(
            "medmesh.device.v1.DeviceService", DeviceServicer(service), pb_grpc.add_DeviceServiceServicer_to_server
        ),
        ServiceBinding(
            "medmesh.device.v1.DeviceInternalService",
            DeviceInternalServicer(DeviceInternal(repository, configs, statuses)),
            internal_pb_grpc.add_DeviceInternalServiceServicer_to_server,
        ),
        *credentials.bindings,
    ]
    background: list[asyncio.Task[None]] = []

    async def start() -> None:
        background.append(asyncio.create_task(trail.run()))
        background.append(asyncio.create_task(credentials.temporary_credentials.run_sweeper()))

    async def stop() -> None:
        await adapters.close()
        await trail.close()
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in (organizations, patients, identity, audit_channel):
            await channel.close()
        await client.close()

    await serve(
        settings,
        bindings,
        readiness(database, repository, configs, statuses, *credentials.repositories, trail),
        on_start=start,
        on_stop=stop,
        authenticator=service_authenticator(identity, internal_methods=INTERNAL_METHODS | credentials.internal_methods),
    )


if __name__ == "__main__":
    asyncio.run(main())
