"""The audit outbox and the audit service's ingest against a real FerretDB, without the rest of the platform.

This module starts its own FerretDB and audit service processes on free 127.0.0.1 ports (no
identity service: ingest takes the mesh credential, not a token) and stops them afterwards.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from pymongo import AsyncMongoClient

from medmesh.audit.v1 import audit_service_pb2 as pb
from medmesh.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit import AuditActor, AuditEvent, Outcome, new_event_id
from medmesh.runtime.audit_outbox import OUTBOX_COLLECTION, OutboxAuditTrail, event_to_document, event_to_pb
from medmesh.runtime.auth import Principal, Role, acting_as
from medmesh.runtime.clients import peer_channel
from medmesh.runtime.mongo import Document
from services.audit.repository import AuditEventRepository
from services.audit.service import AuditService
from tests.integration.platform import free_ports
from tests.integration.stores import ServiceProcess, ferretdb

INTERNAL_TOKEN = "audit-outbox-test-credential"
INGEST = "medmesh.audit.v1.AuditIngestService"
Client = AsyncMongoClient[Document]


@pytest.fixture(scope="module")
def mongodb_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with ferretdb(tmp_path_factory.mktemp("ferretdb")) as uri:
        yield uri


class AuditProcess(ServiceProcess):
    """`python -m services.audit` on a free port, with its own database and no identity service."""

    def __init__(self, mongodb_uri: str, database: str, port: int, log_path: Path) -> None:
        (unused_identity_port,) = free_ports(1)
        env = {
            **os.environ,
            "MEDMESH_MONGODB_URI": mongodb_uri,
            "MEDMESH_MONGODB_DATABASE": database,
            "MEDMESH_GRPC_PORT": str(port),
            "MEDMESH_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "MEDMESH_IDENTITY_ADDR": f"127.0.0.1:{unused_identity_port}",
            "MEDMESH_HEALTH_INTERVAL_SECONDS": "0.3",
            "MEDMESH_SHUTDOWN_GRACE_SECONDS": "3",
        }
        super().__init__("services.audit", env, port, INGEST, log_path)


AuditFactory = Callable[[], AuditProcess]


@pytest.fixture
def audit_database() -> str:
    return f"medmesh_audit_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def audit_port() -> int:
    (port,) = free_ports(1)
    return port


@pytest.fixture
def start_audit(mongodb_uri: str, audit_database: str, audit_port: int, tmp_path: Path) -> Iterator[AuditFactory]:
    started: list[AuditProcess] = []

    def start() -> AuditProcess:
        process = AuditProcess(mongodb_uri, audit_database, audit_port, tmp_path / f"audit-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


@pytest.fixture
async def mongo(mongodb_uri: str) -> AsyncIterator[Client]:
    client: Client = AsyncMongoClient(mongodb_uri, tz_aware=True)
    yield client
    await client.close()


@pytest.fixture
async def audit_channel(monkeypatch: pytest.MonkeyPatch, audit_port: int) -> AsyncIterator[grpc.aio.Channel]:
    """How a service reaches the audit service: peer_channel attaches the mesh credential."""
    monkeypatch.setenv("MEDMESH_INTERNAL_TOKEN", INTERNAL_TOKEN)
    channel = peer_channel("audit", f"127.0.0.1:{audit_port}", caller="patient")
    yield channel
    await channel.close()


T0 = datetime(2026, 5, 1, tzinfo=UTC)


def an_event(
    index: int, *, seconds: float | None = None, subject: str = "organizations/clinic-a/users/u1"
) -> AuditEvent:
    at = T0 + timedelta(seconds=index if seconds is None else seconds)
    return AuditEvent(
        id=new_event_id(at),
        organization="organizations/clinic-a",
        resource=f"organizations/clinic-a/patients/p{index % 3}",
        event_time=at,
        actor=AuditActor(subject, "organizations/clinic-a", "clinician"),
        method="medmesh.patient.v1.PatientService/GetPatient",
        service="patient",
        outcome=Outcome.SUCCEEDED if index % 4 else Outcome.DENIED,
        phi_fields_read=("given_name",),
        source_ip="203.0.113.5",
    )


async def until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


# --- outbox -> ingest ---------------------------------------------------------------------------


async def test_events_recorded_while_audit_is_down_are_delivered_exactly_once(
    mongo: Client, audit_channel: grpc.aio.Channel, audit_database: str, start_audit: AuditFactory
) -> None:
    service_database = mongo[f"medmesh_patient_{uuid.uuid4().hex[:8]}"]
    outbox = service_database[OUTBOX_COLLECTION]
    stored = mongo[audit_database]["audit_events"]
    # Two instances of one service share the outbox: both flush it, either may send an event twice.
    trails = [
        OutboxAuditTrail(service_database, "patient", audit_channel, batch_size=40, max_backoff=0.5) for _ in range(2)
    ]
    tasks = [asyncio.create_task(trail.run()) for trail in trails]
    events = [an_event(i) for i in range(150)]
    try:
        for index, event in enumerate(events):
            await trails[index % 2].record(event)
        await trails[0].record(events[0])  # a retried call records the same event again
        assert await outbox.count_documents({}) == 150
        await asyncio.sleep(0.5)  # both loops fail and back off; nothing may leave the outbox
        assert await outbox.count_documents({}) == 150

        audit = start_audit()
        audit.wait_serving()

        async def outbox_empty() -> bool:
            return await outbox.count_documents({}) == 0

        await until(outbox_empty, 15, "the outbox was not emptied")
        documents = {d["_id"]: d async for d in stored.find({})}
        assert documents == {e.id: event_to_document(e) for e in events}

        # Recorded while the audit service is up: delivered promptly (the poll interval is 3 s).
        late = an_event(1000)
        started = time.monotonic()
        await trails[1].record(late)

        async def late_stored() -> bool:
            return await stored.count_documents({"_id": late.id}) == 1

        await until(late_stored, 2, "a record did not wake the delivery loop")
        assert time.monotonic() - started < 1.5
    finally:
        for trail in trails:
            await trail.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert await stored.count_documents({}) == 151
    assert await outbox.count_documents({}) == 0


async def test_a_restart_picks_up_what_a_crashed_process_left(
    mongo: Client, audit_channel: grpc.aio.Channel, audit_database: str, start_audit: AuditFactory
) -> None:
    service_database = mongo[f"medmesh_patient_{uuid.uuid4().hex[:8]}"]
    outbox = service_database[OUTBOX_COLLECTION]
    stored = mongo[audit_database]["audit_events"]
    crashed = OutboxAuditTrail(service_database, "patient", audit_channel, close_timeout=0.3)
    await crashed.record(an_event(1))  # its loop never ran, as if the process died after the write
    await crashed.close()  # the last flush fails fast: audit is down; the event stays
    assert await outbox.count_documents({}) == 1

    audit = start_audit()
    audit.wait_serving()
    # The restarted process has a new channel (the old one waits out gRPC's reconnect backoff).
    fresh = peer_channel("audit", audit.address, caller="patient")
    restarted = OutboxAuditTrail(service_database, "patient", fresh)
    loop = asyncio.create_task(restarted.run())
    try:
        await restarted.record(an_event(2))

        async def both_delivered() -> bool:
            return await stored.count_documents({}) == 2 and await outbox.count_documents({}) == 0

        await until(both_delivered, 30, "the restarted process did not deliver the crashed one's event")
    finally:
        await restarted.close()
        await asyncio.wait_for(loop, 5)
        await fresh.close()


async def test_ingest_is_idempotent_and_takes_only_the_mesh_credential(
    mongo: Client, audit_channel: grpc.aio.Channel, audit_database: str, start_audit: AuditFactory, audit_port: int
) -> None:
    start_audit().wait_serving()
    stub = pb_grpc.AuditIngestServiceStub(audit_channel)
    events = [an_event(i) for i in range(5)]
    request = pb.WriteAuditEventsRequest(audit_events=[event_to_pb(e) for e in events])

    first = await stub.WriteAuditEvents(request, timeout=10)
    again = await stub.WriteAuditEvents(request, timeout=10)
    overlap = await stub.WriteAuditEvents(
        pb.WriteAuditEventsRequest(audit_events=[event_to_pb(events[0]), event_to_pb(an_event(9))]), timeout=10
    )

    assert (first.stored_count, first.duplicate_count) == (5, 0)
    assert (again.stored_count, again.duplicate_count) == (0, 5)
    assert (overlap.stored_count, overlap.duplicate_count) == (1, 1)
    assert await mongo[audit_database]["audit_events"].count_documents({}) == 6

    async with grpc.aio.insecure_channel(f"127.0.0.1:{audit_port}") as bare:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await pb_grpc.AuditIngestServiceStub(bare).WriteAuditEvents(request, timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await pb_grpc.AuditIngestServiceStub(bare).WriteAuditEvents(
                request, timeout=10, metadata=[("x-medmesh-internal", "guess")]
            )
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED

    bad = event_to_pb(an_event(20))
    bad.name = "organizations/clinic-a/events/x"
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.WriteAuditEvents(
            pb.WriteAuditEventsRequest(audit_events=[event_to_pb(an_event(21)), bad]), timeout=10
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await mongo[audit_database]["audit_events"].count_documents({}) == 6


# --- the repository's queries --------------------------------------------------------------------


async def test_lists_newest_first_with_filters_on_ferretdb(mongo: Client, audit_database: str) -> None:
    database = mongo[audit_database]
    repository = AuditEventRepository(database)
    await repository.ensure_indexes()
    nurse = "organizations/clinic-a/users/nurse"
    events = [an_event(i, subject=nurse if i % 5 == 0 else "organizations/clinic-a/users/u1") for i in range(23)]
    other = replace(an_event(100), organization="organizations/clinic-b")
    result = await repository.insert_batch([*events, other, events[3]])
    assert (result.stored, result.duplicates) == (24, 1)
    service = AuditService(repository)

    async def ids(filter_text: str, page_size: int, parent: str = "organizations/clinic-a") -> list[str]:
        collected: list[str] = []
        token = ""
        with acting_as(Principal("organizations/m/users/root", "organizations/m", Role.PLATFORM_ADMIN)):
            while True:
                page = await service.list_events(parent, filter_text, page_size, token)
                collected += [e.id for e in page.audit_events]
                token = page.next_page_token
                if not token:
                    return collected

    newest_first = [e.id for e in reversed(events)]
    assert await ids("", 4) == newest_first
    assert await ids("", 5, "organizations/-") == [other.id, *newest_first]
    assert await ids(f'actor = "{nurse}"', 2) == [e.id for e in reversed(events) if e.actor.subject == nurse]
    assert await ids('resource = "organizations/clinic-a/patients/p1" AND outcome = OUTCOME_DENIED', 2) == [
        e.id for e in reversed(events) if e.resource.endswith("/p1") and e.outcome is Outcome.DENIED
    ]
    window = 'event_time >= "2026-05-01T00:00:05Z" AND event_time < "2026-05-01T02:00:10+02:00"'
    assert await ids(window, 3) == newest_first[13:18]
    assert await ids('event_time > "2026-05-01T00:00:21Z"', 1) == newest_first[:1]
    assert await ids('event_time <= "2026-05-01T00:00:00Z"', 10) == newest_first[-1:]
    stored = await repository.get("organizations/clinic-a", events[7].id)
    assert stored == events[7]
    assert await repository.get("organizations/clinic-b", events[7].id) is None
