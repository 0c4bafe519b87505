"""Runs the patient service: `python -m services.patient`."""

from __future__ import annotations

import asyncio
import contextlib

from medmesh.patient.v1 import patient_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit_outbox import OutboxAuditTrail
from medmesh.runtime.clients import peer_channel, service_authenticator
from medmesh.runtime.directories import GrpcOrganizationDirectory
from medmesh.runtime.mongo import connect, readiness
from medmesh.runtime.server import ServiceBinding, configure_process, serve
from medmesh.runtime.settings import Settings
from services.patient.repository import PatientRepository
from services.patient.service import PatientService
from services.patient.servicer import PatientServicer


async def main() -> None:
    settings = Settings.from_env("patient")
    configure_process(settings)
    client, database = connect(settings)
    identity = peer_channel("identity", caller=settings.service)
    organizations = peer_channel("organization", caller=settings.service)
    audit_channel = peer_channel("audit", caller=settings.service)
    repository = PatientRepository(database)
    # Audit events go to an outbox in this service's own database first, so a PHI read is
    # recorded even while the audit service is down; the flusher delivers them.
    trail = OutboxAuditTrail(database, settings.service, audit_channel)
    service = PatientService(repository, GrpcOrganizationDirectory(organizations), trail)
    binding = ServiceBinding(
        "medmesh.patient.v1.PatientService", PatientServicer(service), pb_grpc.add_PatientServiceServicer_to_server
    )
    background: list[asyncio.Task[None]] = []

    async def start() -> None:
        background.append(asyncio.create_task(trail.run()))

    async def stop() -> None:
        await trail.close()
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in (identity, organizations, audit_channel):
            await channel.close()
        await client.close()

    await serve(
        settings,
        [binding],
        readiness(database, repository, trail),
        on_start=start,
        on_stop=stop,
        authenticator=service_authenticator(identity),
    )


if __name__ == "__main__":
    asyncio.run(main())
