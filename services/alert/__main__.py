"""Runs the alert service: `python -m services.alert`."""

from __future__ import annotations

import asyncio
import contextlib

from medmesh.alert.v1 import alert_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit_outbox import OutboxAuditTrail
from medmesh.runtime.clients import peer_channel, service_authenticator
from medmesh.runtime.directories import GrpcDeviceDirectory
from medmesh.runtime.mongo import connect, readiness
from medmesh.runtime.server import ServiceBinding, configure_process, serve
from medmesh.runtime.settings import Settings
from services.alert.evaluation import RuleCache, RuleEvaluator
from services.alert.repository import AlertRepository, AlertRuleRepository, RuleStateRepository
from services.alert.service import AlertRuleService, AlertService
from services.alert.servicer import EVALUATE_OBSERVATIONS, AlertInternalServicer, AlertServicer


async def main() -> None:
    settings = Settings.from_env("alert")
    configure_process(settings)
    client, database = connect(settings)
    identity = peer_channel("identity", caller=settings.service)
    device_channel = peer_channel("device", caller=settings.service)
    audit_channel = peer_channel("audit", caller=settings.service)
    alerts = AlertRepository(database)
    rules = AlertRuleRepository(database)
    states = RuleStateRepository(database)
    # Audit events go to an outbox in this service's own database first; the flusher delivers them.
    trail = OutboxAuditTrail(database, settings.service, audit_channel)
    # Asked when a person raises an alert or names a device in a rule, never per observation:
    # no cache, the answer is always the current assignment.
    devices = GrpcDeviceDirectory(device_channel, cache_seconds=0)
    cache = RuleCache(rules)
    bindings = [
        ServiceBinding(
            "medmesh.alert.v1.AlertService",
            AlertServicer(AlertService(alerts, devices, trail), AlertRuleService(rules, states, devices, cache, trail)),
            pb_grpc.add_AlertServiceServicer_to_server,
        ),
        ServiceBinding(
            "medmesh.alert.v1.AlertInternalService",
            AlertInternalServicer(RuleEvaluator(cache, alerts, states, trail)),
            pb_grpc.add_AlertInternalServiceServicer_to_server,
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
        for channel in (identity, device_channel, audit_channel):
            await channel.close()
        await client.close()

    await serve(
        settings,
        bindings,
        readiness(database, alerts, rules, states, trail),
        on_start=start,
        on_stop=stop,
        # Ingest comes from the observation service with the mesh credential, never a user token.
        authenticator=service_authenticator(identity, internal_methods=frozenset({EVALUATE_OBSERVATIONS})),
    )


if __name__ == "__main__":
    asyncio.run(main())
