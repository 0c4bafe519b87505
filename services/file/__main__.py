"""Runs the file service: `python -m services.file`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from medmesh.file.v1 import file_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit_outbox import OutboxAuditTrail
from medmesh.runtime.auth import acting_as, internal_principal
from medmesh.runtime.clients import peer_channel, service_authenticator
from medmesh.runtime.directories import GrpcDeviceDirectory
from medmesh.runtime.mongo import connect, readiness
from medmesh.runtime.server import ServiceBinding, configure_process, serve
from medmesh.runtime.settings import Settings
from medmesh.runtime.tasks import stop_requested
from services.file.config import FileConfig
from services.file.repository import FileRepository
from services.file.service import SWEEP_BATCH, FileService
from services.file.servicer import FileInternalServicer, FileServicer
from services.file.storage import S3FileStorage

log = logging.getLogger("services.file")

INTERNAL_SERVICE = "medmesh.file.v1.FileInternalService"
INTERNAL_METHODS = frozenset(
    f"/{INTERNAL_SERVICE}/{method}" for method in ("CreateDeviceFile", "CompleteDeviceFile", "SweepExpiredUploads")
)


async def sweep_forever(service: FileService, interval: float) -> None:
    """Expires abandoned uploads every `interval` seconds, in batches until none is left.

    Every replica runs it: settlements make concurrent sweeps of one file harmless.
    """
    while not stop_requested():
        await asyncio.sleep(interval)
        try:
            with acting_as(internal_principal("file-sweeper")):
                while len(expired := await service.sweep_expired(SWEEP_BATCH)) == SWEEP_BATCH:
                    log.info("expired %d uploads; more to go", len(expired))
                if expired:
                    log.info("expired %d uploads", len(expired))
        except Exception:  # the database or storage is down: try again next round
            log.warning("expiry sweep failed", exc_info=True)


async def cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def main() -> None:
    settings = Settings.from_env("file")
    configure_process(settings)
    try:
        config = FileConfig.from_env(settings)
        storage = S3FileStorage.from_settings(settings, config.bucket, config.public_endpoint)
    except ValueError as error:
        raise SystemExit(f"file service: {error}") from error
    client, database = connect(settings)
    identity = peer_channel("identity", caller=settings.service)
    devices = peer_channel("device", caller=settings.service)
    audit_channel = peer_channel("audit", caller=settings.service)
    repository = FileRepository(database)
    # Audit events go to an outbox in this service's own database first; the flusher delivers them.
    trail = OutboxAuditTrail(database, settings.service, audit_channel)
    # Asked once per file created: no cache, a file goes to the device's organization at that moment.
    service = FileService(repository, storage, GrpcDeviceDirectory(devices, cache_seconds=0), trail, config.policy)
    bindings = [
        ServiceBinding("medmesh.file.v1.FileService", FileServicer(service), pb_grpc.add_FileServiceServicer_to_server),
        ServiceBinding(
            INTERNAL_SERVICE, FileInternalServicer(service), pb_grpc.add_FileInternalServiceServicer_to_server
        ),
    ]
    # The bucket is created on the first successful check, so storage coming up late is fine.
    database_ready = readiness(database, repository, trail, setup=[storage.ensure_bucket])

    async def ready() -> None:
        await database_ready()
        await storage.check()

    sweeper: list[asyncio.Task[None]] = []
    background: list[asyncio.Task[None]] = []

    async def start() -> None:
        background.append(asyncio.create_task(trail.run()))
        sweeper.append(asyncio.create_task(sweep_forever(service, config.sweep_interval_seconds)))

    async def stop() -> None:
        # The sweeper first, so the outbox's last flush carries its events too.
        await cancel(sweeper)
        await trail.close()
        await cancel(background)
        for channel in (identity, devices, audit_channel):
            await channel.close()
        storage.close()
        await client.close()

    await serve(
        settings,
        bindings,
        ready,
        on_start=start,
        on_stop=stop,
        authenticator=service_authenticator(identity, internal_methods=INTERNAL_METHODS),
    )


if __name__ == "__main__":
    asyncio.run(main())
