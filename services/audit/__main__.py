"""Runs the audit service: `python -m services.audit`."""

from __future__ import annotations

import asyncio

from medmesh.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medmesh.runtime.clients import peer_channel, service_authenticator
from medmesh.runtime.mongo import connect, readiness
from medmesh.runtime.server import ServiceBinding, configure_process, serve
from medmesh.runtime.settings import Settings
from services.audit.repository import AuditEventRepository
from services.audit.service import AuditService
from services.audit.servicer import WRITE_AUDIT_EVENTS, AuditIngestServicer, AuditServicer


async def main() -> None:
    settings = Settings.from_env("audit")
    configure_process(settings)
    client, database = connect(settings)
    identity = peer_channel("identity", caller=settings.service)
    repository = AuditEventRepository(database)
    service = AuditService(repository)
    bindings = [
        ServiceBinding(
            "medmesh.audit.v1.AuditService", AuditServicer(service), pb_grpc.add_AuditServiceServicer_to_server
        ),
        ServiceBinding(
            "medmesh.audit.v1.AuditIngestService",
            AuditIngestServicer(service),
            pb_grpc.add_AuditIngestServiceServicer_to_server,
        ),
    ]
    # Token keys come from identity; ingest needs none of them: it takes the mesh credential.
    authenticator = service_authenticator(identity, internal_methods=frozenset({WRITE_AUDIT_EVENTS}))

    async def close() -> None:
        await identity.close()
        await client.close()

    await serve(settings, bindings, readiness(database, repository), on_stop=close, authenticator=authenticator)


if __name__ == "__main__":
    asyncio.run(main())
