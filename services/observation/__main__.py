"""Runs the observation service: `python -m services.observation`."""

from __future__ import annotations

import asyncio
import contextlib

from medmesh.observation.v1 import observation_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit_outbox import OutboxAuditTrail
from medmesh.runtime.clients import peer_channel, service_authenticator
from medmesh.runtime.directories import GrpcDeviceDirectory
from medmesh.runtime.mongo import connect, readiness
from medmesh.runtime.server import ServiceBinding, configure_process, serve
from medmesh.runtime.settings import Settings
from services.observation.alerts import BestEffortAlertEvaluator, GrpcAlertEvaluator
from services.observation.repository import ObservationRepository
from services.observation.service import ObservationService
from services.observation.servicer import INTERNAL_METHODS, ObservationInternalServicer, ObservationServicer


async def main() -> None:
    settings = Settings.from_env("observation")
    configure_process(settings)
    client, database = connect(settings)
    identity = peer_channel("identity", caller=settings.service)
    devices_channel = peer_channel("device", caller=settings.service)
    alerts_channel = peer_channel("alert", caller=settings.service)
    audit_channel = peer_channel("audit", caller=settings.service)
    repository = ObservationRepository(database)
    trail = OutboxAuditTrail(database, settings.service, audit_channel)
    service = ObservationService(
        repository,
        # One lookup per batch, and the adapter may send a batch per message: answers are cached.
        GrpcDeviceDirectory(devices_channel),
        # Ingest never waits on, or fails because of, the alert service.
        BestEffortAlertEvaluator(GrpcAlertEvaluator(alerts_channel)),
        trail,
    )
    bindings = [
        ServiceBinding(
            "medmesh.observation.v1.ObservationService",
            ObservationServicer(service),
            pb_grpc.add_ObservationServiceServicer_to_server,
        ),
        ServiceBinding(
            "medmesh.observation.v1.ObservationInternalService",
            ObservationInternalServicer(service),
            pb_grpc.add_ObservationInternalServiceServicer_to_server,
        ),
    ]
    background: list[asyncio.Task[None]] = []

    async def start() -> None:
        background.append(asyncio.create_task(trail.run()))

    async def stop() -> None:
        await trail.close()
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in (identity, devices_channel, alerts_channel, audit_channel):
            await channel.close()
        await client.close()

    await serve(
        settings,
        bindings,
        readiness(database, repository, trail),
        on_start=start,
        on_stop=stop,
        # Device telemetry from the MQTT adapter carries the mesh credential, not a user token.
        authenticator=service_authenticator(identity, internal_methods=INTERNAL_METHODS),
    )


if __name__ == "__main__":
    asyncio.run(main())
