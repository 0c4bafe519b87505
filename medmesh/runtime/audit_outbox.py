"""The audit outbox: how a service hands its audit events to the audit service without waiting for it.

`OutboxAuditTrail.record` inserts the event into the emitting service's own database
(collection `audit_outbox`): one local write, as durable as the action it describes, and
independent of the audit service being up. `run` delivers the oldest events in batches to
`AuditIngestService.WriteAuditEvents` and deletes exactly the ones delivered. Delivery is
at-least-once (a crash between send and delete, or two instances flushing the same outbox,
sends an event twice); the audit service stores each event id once, so nothing is lost and
nothing is stored twice.

Wiring, in a service's `__main__`:

    trail = OutboxAuditTrail(database, settings.service, peer_channel("audit", caller=settings.service))
    readiness(database, repository, trail)          # ensure_indexes
    on_start: asyncio.create_task(trail.run())      # the delivery loop
    on_stop:  await trail.close()                   # stop it after a last bounded flush

The conversions AuditEvent <-> document <-> protobuf live here too: the audit service stores
the same document shape and reuses the protobuf conversion.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from medmesh.audit.v1 import audit_service_pb2 as pb
from medmesh.audit.v1 import audit_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit import AuditActor, AuditEvent, Outcome
from medmesh.runtime.errors import InvalidArgument
from medmesh.runtime.mongo import Document
from medmesh.runtime.protoconv import timestamp
from medmesh.runtime.tasks import stop_requested

log = logging.getLogger(__name__)

OUTBOX_COLLECTION = "audit_outbox"
# Events the audit service refused as invalid: kept (never dropped) for an operator to look at,
# so one bad event cannot block every event behind it.
REJECTED_COLLECTION = "audit_outbox_rejected"
MAX_BATCH = 500  # WriteAuditEventsRequest.audit_events max_items

_ID = r"[a-z0-9-]{1,63}"
_ORGANIZATION = re.compile(rf"^organizations/{_ID}$")
_EVENT_ID = re.compile(rf"^{_ID}$")
_EVENT_NAME = re.compile(rf"^(organizations/{_ID})/auditEvents/({_ID})$")

_OUTCOME_TO_PB = {
    Outcome.SUCCEEDED: pb.AuditEvent.OUTCOME_SUCCEEDED,
    Outcome.DENIED: pb.AuditEvent.OUTCOME_DENIED,
}
_OUTCOME_FROM_PB = {value: key for key, value in _OUTCOME_TO_PB.items()}


# --- names ------------------------------------------------------------------------------------


def event_name(event: AuditEvent) -> str:
    """`organizations/{o}/auditEvents/{id}`."""
    return f"{event.organization}/auditEvents/{event.id}"


def parse_event_name(name: str, field: str = "name") -> tuple[str, str]:
    """`organizations/{o}/auditEvents/{id}` -> (`organizations/{o}`, id)."""
    match = _EVENT_NAME.match(name)
    if not match:
        raise InvalidArgument.for_field(
            field,
            f"must look like organizations/{{organization}}/auditEvents/{{id}}, got {name!r}",
            reason="INVALID_NAME",
        )
    return match.group(1), match.group(2)


def check_event(event: AuditEvent) -> None:
    """Raises ValueError for an event the audit service could never name: a bug of the emitting service."""
    if not _ORGANIZATION.match(event.organization) or event.organization == "organizations/-":
        raise ValueError(
            f"audit event {event.id!r}: organization must be organizations/{{id}}, got {event.organization!r}"
        )
    if not _EVENT_ID.match(event.id):
        raise ValueError(f"audit event id must match {_ID}, got {event.id!r}")
    if event.event_time.tzinfo is None:
        raise ValueError(f"audit event {event.id!r}: event_time must be timezone-aware")


# --- AuditEvent <-> document ------------------------------------------------------------------


def _millis(moment: datetime) -> datetime:
    # BSON dates keep milliseconds: truncate here, so a stored event equals the one read back.
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def event_to_document(event: AuditEvent) -> Document:
    """The stored shape, in the outbox and in the audit service's database alike; `_id` is the event id."""
    return {
        "_id": event.id,
        "organization": event.organization,
        "event_time": _millis(event.event_time),
        "actor": {"subject": event.actor.subject, "organization": event.actor.organization, "role": event.actor.role},
        "method": event.method,
        "resource": event.resource,
        "outcome": event.outcome.value,
        "phi_fields_read": list(event.phi_fields_read),
        "phi_fields_changed": list(event.phi_fields_changed),
        "source_ip": event.source_ip,
        "service": event.service,
        "trace_id": event.trace_id,
        "description": event.description,
    }


def event_from_document(document: Document) -> AuditEvent:
    moment: datetime = document["event_time"]
    actor: dict[str, Any] = document["actor"]
    return AuditEvent(
        id=document["_id"],
        organization=document["organization"],
        resource=document["resource"],
        # A client without tz_aware=True returns naive UTC.
        event_time=moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC),
        actor=AuditActor(actor["subject"], actor.get("organization", ""), actor.get("role", "")),
        method=document["method"],
        service=document["service"],
        outcome=Outcome(document["outcome"]),
        phi_fields_read=tuple(document.get("phi_fields_read", ())),
        phi_fields_changed=tuple(document.get("phi_fields_changed", ())),
        source_ip=document.get("source_ip", ""),
        trace_id=document.get("trace_id", ""),
        description=document.get("description", ""),
    )


# --- AuditEvent <-> protobuf ------------------------------------------------------------------


def event_to_pb(event: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        name=event_name(event),
        event_time=timestamp(event.event_time),
        actor=pb.Actor(subject=event.actor.subject, organization=event.actor.organization, role=event.actor.role),
        method=event.method,
        resource=event.resource,
        outcome=_OUTCOME_TO_PB[event.outcome],
        phi_fields_read=list(event.phi_fields_read),
        phi_fields_changed=list(event.phi_fields_changed),
        source_ip=event.source_ip,
        service=event.service,
        trace_id=event.trace_id,
        description=event.description,
    )


def event_from_pb(message: pb.AuditEvent, field: str = "audit_event") -> AuditEvent:
    """An event as sent to the ingest; INVALID_ARGUMENT naming `field` if it cannot be stored."""
    organization, event_id = parse_event_name(message.name, f"{field}.name")
    if not message.HasField("event_time"):
        raise InvalidArgument.for_field(f"{field}.event_time", "is required", reason="REQUIRED_FIELD")
    outcome = _OUTCOME_FROM_PB.get(message.outcome)
    if outcome is None:
        raise InvalidArgument.for_field(f"{field}.outcome", "must be SUCCEEDED or DENIED", reason="REQUIRED_FIELD")
    return AuditEvent(
        id=event_id,
        organization=organization,
        resource=message.resource,
        event_time=message.event_time.ToDatetime(tzinfo=UTC),
        actor=AuditActor(message.actor.subject, message.actor.organization, message.actor.role),
        method=message.method,
        service=message.service,
        outcome=outcome,
        phi_fields_read=tuple(message.phi_fields_read),
        phi_fields_changed=tuple(message.phi_fields_changed),
        source_ip=message.source_ip,
        trace_id=message.trace_id,
        description=message.description,
    )


# --- the outbox -------------------------------------------------------------------------------


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


def _invalid_argument(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT


class OutboxAuditTrail:
    """An `AuditTrail` that keeps events in the service's own database until the audit service has them."""

    def __init__(
        self,
        database: AsyncDatabase[Document],
        service: str,
        audit_channel: grpc.aio.Channel,
        *,
        batch_size: int = MAX_BATCH,
        poll_interval: float = 3.0,
        linger: float = 0.2,
        min_backoff: float = 0.2,
        max_backoff: float = 10.0,
        send_timeout: float = 10.0,
        close_timeout: float = 2.0,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH}, got {batch_size}")
        self.service = service
        self._outbox = database[OUTBOX_COLLECTION]
        self._rejected = database[REJECTED_COLLECTION]
        self._ingest = pb_grpc.AuditIngestServiceStub(audit_channel)
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._linger = linger
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._send_timeout = send_timeout
        self._close_timeout = close_timeout
        self._wake = asyncio.Event()
        self._closed = False
        self._loop: asyncio.Task[None] | None = None
        self._failed_attempts = 0  # of the current outage; 0 when delivery works

    async def ensure_indexes(self) -> None:
        """Nothing to add: the outbox is read oldest first by `_id` (time-ordered event ids), which
        the default index serves. Here so the outbox joins a service's readiness check."""

    async def record(self, event: AuditEvent) -> None:
        """One insert into the outbox; the delivery loop is woken but not waited for."""
        check_event(event)
        # A retried call may record the same event again: once is enough.
        with contextlib.suppress(DuplicateKeyError):
            await self._outbox.insert_one(event_to_document(event))
        self._wake.set()

    async def run(self) -> None:
        """Delivers events until `close()`; start it as a background task."""
        if self._closed:
            return
        # A fresh context: the loop must never send a request's bearer token or join its trace.
        self._loop = asyncio.create_task(
            self._deliver_forever(), name=f"audit-outbox-{self.service}", context=contextvars.Context()
        )
        try:
            await self._loop
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._closed or (current is not None and current.cancelling()):
                raise  # our owner cancelled us, not close()

    async def close(self) -> None:
        """Stops the loop, then one last flush bounded by `close_timeout`; what is left waits for the next start."""
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.done():
            loop.cancel()
            await asyncio.wait([loop])
        try:
            async with asyncio.timeout(self._close_timeout):
                await self._deliver_pending()
        except (TimeoutError, grpc.aio.AioRpcError, PyMongoError) as error:
            log.warning("audit outbox of %s: events wait for the next start (%s)", self.service, _describe(error))

    # --- delivery -----------------------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        backoff = 0.0
        while not stop_requested():
            try:
                await self._deliver_pending()
            except Exception as error:  # any failure is an outage to wait out; the loop must live on
                backoff = min(self._max_backoff, max(self._min_backoff, backoff * 2))
                self._failing(error)
                # Records made meanwhile do not cut the backoff short: they would hammer a peer that is down.
                await asyncio.sleep(backoff)
                continue
            if self._failed_attempts:
                log.info(
                    "audit outbox of %s: delivering again after %d failed attempts",
                    self.service,
                    self._failed_attempts,
                )
                self._failed_attempts = 0
            backoff = 0.0
            # Woken by record(); the poll picks up events of other instances and of crashed ones.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
                # Then `linger`, so a burst of events (a command's life makes three) is one batch:
                # one read, one call and one delete, instead of each per event.
                await asyncio.sleep(self._linger)

    def _failing(self, error: Exception) -> None:
        self._failed_attempts += 1
        if self._failed_attempts > 1:
            return  # logged once per outage, not per attempt
        expected = isinstance(error, grpc.aio.AioRpcError | PyMongoError)
        log.log(
            logging.WARNING if expected else logging.ERROR,
            "audit outbox of %s: cannot deliver, events wait in the outbox (%s); retrying with backoff up to %.0fs",
            self.service,
            _describe(error),
            self._max_backoff,
            exc_info=None if expected else error,
        )

    async def _deliver_pending(self) -> None:
        """Sends and deletes batches, oldest first, until the outbox is (momentarily) empty."""
        while True:
            # Cleared before reading: a record() from now on wakes the loop again.
            self._wake.clear()
            documents = await self._outbox.find({}).sort("_id", 1).limit(self._batch_size).to_list()
            if not documents:
                return
            await self._deliver(documents)
            if len(documents) < self._batch_size:
                return

    async def _deliver(self, documents: Sequence[Document]) -> None:
        readable: list[tuple[Document, pb.AuditEvent]] = []
        for document in documents:
            try:
                readable.append((document, event_to_pb(event_from_document(document))))
            except (KeyError, ValueError, TypeError, AttributeError) as error:
                await self._reject(document, f"unreadable outbox document: {_describe(error)}")
        if not readable:
            return
        try:
            await self._send([message for _, message in readable])
        except grpc.aio.AioRpcError as error:
            if not _invalid_argument(error):
                raise
            # Some event is invalid: find it one by one, so the others still get through.
            for document, message in readable:
                await self._deliver_one(document, message)
            return
        await self._outbox.delete_many({"_id": {"$in": [document["_id"] for document, _ in readable]}})

    async def _deliver_one(self, document: Document, message: pb.AuditEvent) -> None:
        try:
            await self._send([message])
        except grpc.aio.AioRpcError as error:
            if not _invalid_argument(error):
                raise
            await self._reject(document, _describe(error))
            return
        await self._outbox.delete_one({"_id": document["_id"]})

    async def _send(self, messages: list[pb.AuditEvent]) -> None:
        request = pb.WriteAuditEventsRequest(audit_events=messages)
        await self._ingest.WriteAuditEvents(request, timeout=self._send_timeout)

    async def _reject(self, document: Document, why: str) -> None:
        log.error(
            "audit outbox of %s: event %s set aside in %s: %s",
            self.service,
            document.get("_id"),
            REJECTED_COLLECTION,
            why,
        )
        kept = {**document, "rejected_reason": why, "rejected_time": datetime.now(UTC)}
        await self._rejected.replace_one({"_id": document["_id"]}, kept, upsert=True)
        await self._outbox.delete_one({"_id": document["_id"]})
