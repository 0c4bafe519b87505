"""The audit outbox: conversions AuditEvent <-> document <-> protobuf, and the delivery loop against
an in-memory collection and a fake ingest channel (the real FerretDB run is in tests/integration)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import grpc
import pytest
from pymongo.errors import DuplicateKeyError

from medmesh.audit.v1 import audit_service_pb2 as pb
from medmesh.runtime.audit import AuditActor, AuditEvent, Outcome, new_event_id
from medmesh.runtime.audit_outbox import (
    OUTBOX_COLLECTION,
    REJECTED_COLLECTION,
    OutboxAuditTrail,
    event_from_document,
    event_from_pb,
    event_to_document,
    event_to_pb,
)
from medmesh.runtime.errors import InvalidArgument
from medmesh.runtime.mongo import Document

T0 = datetime(2026, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)
WRITE = "/medmesh.audit.v1.AuditIngestService/WriteAuditEvents"


def an_event(seconds: float = 0, **changes: Any) -> AuditEvent:
    at = T0 + timedelta(seconds=seconds)
    event = AuditEvent(
        id=new_event_id(at),
        organization="organizations/clinic-a",
        resource="organizations/clinic-a/patients/p1",
        event_time=at,
        actor=AuditActor("organizations/clinic-a/users/u1", "organizations/clinic-a", "clinician"),
        method="medmesh.patient.v1.PatientService/GetPatient",
        service="patient",
        outcome=Outcome.DENIED,
        phi_fields_read=("given_name", "birth_date"),
        phi_fields_changed=("phone",),
        source_ip="203.0.113.9",
        trace_id="0123456789abcdef" * 2,
        description="why not",
    )
    return replace(event, **changes)


# --- conversions ----------------------------------------------------------------------------------


def test_document_round_trip() -> None:
    event = an_event()
    document = event_to_document(event)
    assert document["_id"] == event.id
    assert document["actor"] == {
        "subject": "organizations/clinic-a/users/u1",
        "organization": "organizations/clinic-a",
        "role": "clinician",
    }
    assert document["outcome"] == "DENIED"
    assert document["phi_fields_read"] == ["given_name", "birth_date"]
    assert event_from_document(document) == event


def test_document_keeps_milliseconds_like_bson() -> None:
    event = an_event(event_time=T0 + timedelta(microseconds=456))
    assert event_to_document(event)["event_time"] == T0
    assert event_from_document(event_to_document(event)) == replace(event, event_time=T0)


def test_document_from_a_naive_client_is_read_as_utc() -> None:
    document = event_to_document(an_event())
    document["event_time"] = T0.replace(tzinfo=None)
    assert event_from_document(document).event_time == T0


def test_protobuf_round_trip() -> None:
    event = an_event(event_time=T0.astimezone(timezone(timedelta(hours=2))))
    message = event_to_pb(event)
    assert message.name == f"organizations/clinic-a/auditEvents/{event.id}"
    assert message.outcome == pb.AuditEvent.OUTCOME_DENIED
    assert message.actor.role == "clinician"
    assert list(message.phi_fields_changed) == ["phone"]
    back = event_from_pb(message)
    assert back == event
    assert back.event_time.tzinfo is UTC


def test_document_to_protobuf_and_back_is_the_same_event() -> None:
    event = an_event(outcome=Outcome.SUCCEEDED, description="", phi_fields_changed=())
    assert event_from_document(event_to_document(event_from_pb(event_to_pb(event)))) == event


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: setattr(m, "name", "organizations/clinic-a/auditevents/x"), "e.name"),
        (lambda m: setattr(m, "name", "clinic-a/auditEvents/x"), "e.name"),
        (lambda m: m.ClearField("event_time"), "e.event_time"),
        (lambda m: setattr(m, "outcome", pb.AuditEvent.OUTCOME_UNSPECIFIED), "e.outcome"),
    ],
)
def test_protobuf_that_cannot_be_stored_names_its_field(mutate: Callable[[pb.AuditEvent], None], field: str) -> None:
    message = event_to_pb(an_event())
    mutate(message)
    with pytest.raises(InvalidArgument) as caught:
        event_from_pb(message, "e")
    assert [v.field for v in caught.value.field_violations] == [field]


# --- fakes of MongoDB and of the audit service ----------------------------------------------------


class FakeCursor:
    def __init__(self, documents: list[Document]) -> None:
        self._documents = documents

    def sort(self, key: str, direction: int) -> FakeCursor:
        self._documents.sort(key=lambda d: d[key], reverse=direction < 0)
        return self

    def limit(self, count: int) -> FakeCursor:
        self._documents = self._documents[:count]
        return self

    async def to_list(self) -> list[Document]:
        return [dict(d) for d in self._documents]


class FakeCollection:
    def __init__(self) -> None:
        self.documents: dict[str, Document] = {}

    async def insert_one(self, document: Document) -> None:
        if document["_id"] in self.documents:
            raise DuplicateKeyError("E11000 duplicate key")
        self.documents[document["_id"]] = dict(document)

    def find(self, query: Document) -> FakeCursor:
        assert query == {}
        return FakeCursor(list(self.documents.values()))

    async def delete_many(self, query: Document) -> None:
        for key in query["_id"]["$in"]:
            self.documents.pop(key, None)

    async def delete_one(self, query: Document) -> None:
        self.documents.pop(query["_id"], None)

    async def replace_one(self, query: Document, document: Document, upsert: bool = False) -> None:
        assert upsert
        self.documents[query["_id"]] = dict(document)


class FakeDatabase(dict[str, FakeCollection]):
    def __missing__(self, name: str) -> FakeCollection:
        self[name] = FakeCollection()
        return self[name]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class FakeIngest:
    """Plays AuditIngestService behind a channel: records batches; can be down, slow or picky."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []  # event names, per call that succeeded
        self.attempts = 0
        self.down = False
        self.hang = False
        self.invalid: set[str] = set()  # names refused as INVALID_ARGUMENT
        self.during_send: Callable[[], Awaitable[None]] | None = None

    def unary_unary(self, method: str, **_: Any) -> Callable[..., Awaitable[pb.WriteAuditEventsResponse]]:
        assert method == WRITE

        # Named as grpc names it: the stub passes `timeout=`.
        async def call(request: pb.WriteAuditEventsRequest, timeout: float | None = None) -> Any:  # noqa: ASYNC109
            self.attempts += 1
            if self.during_send is not None:
                hook, self.during_send = self.during_send, None
                await hook()
            if self.hang:
                await asyncio.sleep(3600)
            if self.down:
                raise rpc_error(grpc.StatusCode.UNAVAILABLE, "audit is down")
            names = [e.name for e in request.audit_events]
            if self.invalid & set(names):
                raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad event")
            self.batches.append(names)
            return pb.WriteAuditEventsResponse(stored_count=len(names))

        return call

    @property
    def delivered(self) -> list[str]:
        return [name for batch in self.batches for name in batch]


def name_of(event: AuditEvent) -> str:
    return f"{event.organization}/auditEvents/{event.id}"


class Harness:
    def __init__(self, **options: Any) -> None:
        self.database = FakeDatabase()
        self.ingest = FakeIngest()
        settings: dict[str, Any] = {"poll_interval": 60.0, "min_backoff": 0.01, "max_backoff": 0.04, **options}
        self.trail = OutboxAuditTrail(cast(Any, self.database), "patient", cast(Any, self.ingest), **settings)
        self.task: asyncio.Task[None] | None = None

    @property
    def outbox(self) -> dict[str, Document]:
        return self.database[OUTBOX_COLLECTION].documents

    @property
    def rejected(self) -> dict[str, Document]:
        return self.database[REJECTED_COLLECTION].documents

    def start(self) -> None:
        self.task = asyncio.create_task(self.trail.run())

    async def stop(self) -> None:
        await self.trail.close()
        if self.task is not None:
            await asyncio.wait_for(self.task, 1)


async def eventually(check: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


# --- record ---------------------------------------------------------------------------------------


async def test_record_is_one_local_insert_and_does_not_call_the_audit_service() -> None:
    harness = Harness()
    harness.ingest.hang = True  # were record() to wait for it, this test would time out
    event = an_event()

    await asyncio.wait_for(harness.trail.record(event), 1)
    await harness.trail.record(event)  # a retried call: still one

    assert harness.outbox == {event.id: event_to_document(event)}
    assert harness.ingest.attempts == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"organization": ""},
        {"organization": "clinic-a"},
        {"organization": "organizations/-"},  # the wildcard of List, not an owner
        {"id": "Not/An/Id"},
        {"event_time": T0.replace(tzinfo=None)},
    ],
)
async def test_record_refuses_an_event_the_audit_service_could_not_name(changes: dict[str, Any]) -> None:
    harness = Harness()
    with pytest.raises(ValueError, match="audit event"):
        await harness.trail.record(an_event(**changes))
    assert harness.outbox == {}


def test_batch_size_is_what_one_ingest_call_takes() -> None:
    for size in (0, 501):
        with pytest.raises(ValueError, match="batch_size"):
            OutboxAuditTrail(cast(Any, FakeDatabase()), "patient", cast(Any, FakeIngest()), batch_size=size)


# --- delivery -------------------------------------------------------------------------------------


async def test_a_record_wakes_the_loop_long_before_the_poll() -> None:
    harness = Harness(poll_interval=60.0)
    harness.start()
    await asyncio.sleep(0.02)  # the loop found the outbox empty and waits
    event = an_event()

    await harness.trail.record(event)

    await eventually(lambda: harness.ingest.delivered == [name_of(event)], within=1.0)
    await eventually(lambda: harness.outbox == {})
    await harness.stop()


async def test_events_recorded_together_are_delivered_in_one_batch() -> None:
    harness = Harness(poll_interval=60.0, linger=0.1)
    harness.start()
    await asyncio.sleep(0.02)
    events = [an_event() for _ in range(3)]

    for event in events:  # as a command's life records them: one after another, not at once
        await harness.trail.record(event)
        await asyncio.sleep(0.01)

    await eventually(lambda: harness.outbox == {}, within=1.0)
    assert [sorted(batch) for batch in harness.ingest.batches] == [sorted(name_of(event) for event in events)]
    await harness.stop()


async def test_the_poll_delivers_events_another_instance_left() -> None:
    harness = Harness(poll_interval=0.05)
    harness.start()
    await asyncio.sleep(0.02)
    event = an_event()
    # Written straight into the shared outbox, as another instance (or one that crashed) would.
    await harness.database[OUTBOX_COLLECTION].insert_one(event_to_document(event))

    await eventually(lambda: harness.ingest.delivered == [name_of(event)])
    await harness.stop()


async def test_oldest_first_in_batches_of_batch_size() -> None:
    harness = Harness(batch_size=3)
    events = [an_event(i) for i in range(7)]
    for event in reversed(events):
        await harness.trail.record(event)

    harness.start()

    await eventually(lambda: harness.outbox == {})
    assert harness.ingest.batches == [
        [name_of(e) for e in events[0:3]],
        [name_of(e) for e in events[3:6]],
        [name_of(events[6])],
    ]
    await harness.stop()


async def test_only_the_delivered_events_are_deleted() -> None:
    harness = Harness()
    first, late = an_event(1), an_event(2)
    await harness.trail.record(first)

    async def record_while_sending() -> None:
        await harness.trail.record(late)

    harness.ingest.during_send = record_while_sending
    harness.start()

    await eventually(lambda: harness.ingest.delivered == [name_of(first), name_of(late)])
    await eventually(lambda: harness.outbox == {})
    assert harness.ingest.batches == [[name_of(first)], [name_of(late)]]
    await harness.stop()


async def test_an_outage_keeps_events_backs_off_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    harness = Harness(min_backoff=0.01, max_backoff=0.04)
    harness.ingest.down = True
    events = [an_event(i) for i in range(3)]
    for event in events:
        await harness.trail.record(event)
    caplog.set_level(logging.INFO, logger="medmesh.runtime.audit_outbox")
    harness.start()

    await eventually(lambda: harness.ingest.attempts >= 6)
    assert len(harness.outbox) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "UNAVAILABLE" in warnings[0].getMessage()

    harness.ingest.down = False
    await eventually(lambda: harness.outbox == {})
    assert harness.ingest.delivered == [name_of(e) for e in events]
    assert any("delivering again" in r.getMessage() for r in caplog.records)
    await harness.stop()


async def test_backoff_grows_to_the_cap_and_records_do_not_cut_it_short() -> None:
    harness = Harness(min_backoff=0.05, max_backoff=0.2)
    harness.ingest.down = True
    await harness.trail.record(an_event())
    harness.start()
    await asyncio.sleep(0.6)  # 0.05 + 0.1 + 0.2 + 0.2: about 5 attempts
    for i in range(50):  # each record sets the wake-up event
        await harness.trail.record(an_event(i + 1))
        await asyncio.sleep(0.002)
    # ~0.7 s at backoffs 0.05, 0.1, 0.2, 0.2, ...: 4-6 attempts; without backoff there would be dozens.
    assert 3 <= harness.ingest.attempts <= 7
    harness.ingest.down = False
    await eventually(lambda: harness.outbox == {}, within=1.0)
    await harness.stop()


async def test_an_invalid_event_is_set_aside_and_the_rest_delivered(caplog: pytest.LogCaptureFixture) -> None:
    harness = Harness()
    events = [an_event(i) for i in range(4)]
    bad = events[2]
    harness.ingest.invalid = {name_of(bad)}
    for event in events:
        await harness.trail.record(event)

    harness.start()

    await eventually(lambda: harness.outbox == {})
    assert sorted(harness.ingest.delivered) == sorted(name_of(e) for e in events if e is not bad)
    assert list(harness.rejected) == [bad.id]
    assert harness.rejected[bad.id]["rejected_reason"] == "INVALID_ARGUMENT: bad event"
    assert event_from_document(harness.rejected[bad.id]) == bad
    assert any(bad.id in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    await harness.stop()


async def test_an_unreadable_document_is_set_aside() -> None:
    harness = Harness()
    good = an_event()
    await harness.database[OUTBOX_COLLECTION].insert_one({"_id": "000000000000broken", "organization": "x"})
    await harness.trail.record(good)

    harness.start()

    await eventually(lambda: harness.outbox == {})
    assert harness.ingest.delivered == [name_of(good)]
    assert list(harness.rejected) == ["000000000000broken"]
    await harness.stop()


# --- close ----------------------------------------------------------------------------------------


async def test_close_flushes_what_is_left_and_run_returns() -> None:
    harness = Harness()
    harness.ingest.down = True
    harness.start()
    event = an_event()
    await harness.trail.record(event)
    await eventually(lambda: harness.ingest.attempts >= 1)
    harness.ingest.down = False

    await harness.stop()  # also asserts run() returned

    assert harness.ingest.delivered == [name_of(event)]
    assert harness.outbox == {}


async def test_close_is_bounded_when_the_audit_service_hangs() -> None:
    harness = Harness(close_timeout=0.2)
    harness.ingest.hang = True
    harness.start()
    await harness.trail.record(an_event())
    await eventually(lambda: harness.ingest.attempts >= 1)

    started = time.monotonic()
    await harness.stop()

    assert time.monotonic() - started < 1.0
    assert len(harness.outbox) == 1  # kept for the next start


async def test_cancelling_the_owner_task_propagates() -> None:
    harness = Harness()
    harness.start()
    await asyncio.sleep(0.01)
    assert harness.task is not None
    harness.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await harness.task
