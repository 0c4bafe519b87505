"""The audit trail as a service sees it: record what happened, never wait for the audit service.

`AuditTrail.record` is called by service-layer code after an action succeeded (or was refused,
for logins). The actor, method, client address and trace come from the current call
(`medmesh.runtime.auth.current_call`), so call sites name only what they know: the resource,
its owner organization and which PHI fields were read or changed (names, never values).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from medmesh.runtime.auth import current_call


class Outcome(StrEnum):
    SUCCEEDED = "SUCCEEDED"
    DENIED = "DENIED"


@dataclass(frozen=True)
class AuditActor:
    subject: str
    organization: str = ""
    role: str = ""


@dataclass(frozen=True)
class AuditEvent:
    """One event, complete, as it is kept in the outbox and sent to the audit service."""

    id: str  # time-ordered and unique: the audit service's idempotency key
    organization: str  # organizations/{o}: owner of the resource acted on
    resource: str
    event_time: datetime
    actor: AuditActor
    method: str
    service: str
    outcome: Outcome = Outcome.SUCCEEDED
    phi_fields_read: tuple[str, ...] = ()
    phi_fields_changed: tuple[str, ...] = ()
    source_ip: str = ""
    trace_id: str = ""
    description: str = ""


def new_event_id(at: datetime | None = None) -> str:
    """12 hex digits of milliseconds, then 12 random: ids sort by time, and never collide in practice."""
    millis = int((at.timestamp() if at else time.time()) * 1000)
    return f"{millis:012x}{secrets.token_hex(6)}"


def event_from_call(
    service: str,
    organization: str,
    resource: str,
    *,
    phi_fields_read: tuple[str, ...] = (),
    phi_fields_changed: tuple[str, ...] = (),
    outcome: Outcome = Outcome.SUCCEEDED,
    description: str = "",
    actor: AuditActor | None = None,
) -> AuditEvent:
    """An event about the call being served; `actor` overrides the caller (for example a failed login)."""
    call = current_call()
    principal = call.principal if call else None
    if actor is None:
        actor = (
            AuditActor(principal.subject, principal.organization, str(principal.role or "internal"))
            if principal
            else AuditActor("anonymous")
        )
    at = datetime.now(UTC)
    return AuditEvent(
        id=new_event_id(at),
        organization=organization,
        resource=resource,
        event_time=at,
        actor=actor,
        method=call.method.lstrip("/") if call else "",
        service=service,
        outcome=outcome,
        phi_fields_read=tuple(phi_fields_read),
        phi_fields_changed=tuple(phi_fields_changed),
        source_ip=call.source_ip if call else "",
        trace_id=call.trace_id if call else "",
        description=description,
    )


class AuditTrail(Protocol):
    service: str

    async def record(self, event: AuditEvent) -> None:
        """Keeps the event durably for delivery; returns without waiting for the audit service."""


@dataclass
class RecordingAuditTrail:
    """In-memory trail for unit tests."""

    service: str = "test"
    events: list[AuditEvent] = field(default_factory=list)

    async def record(self, event: AuditEvent) -> None:
        self.events.append(event)


async def audit(
    trail: AuditTrail,
    organization: str,
    resource: str,
    *,
    phi_fields_read: tuple[str, ...] = (),
    phi_fields_changed: tuple[str, ...] = (),
    outcome: Outcome = Outcome.SUCCEEDED,
    description: str = "",
    actor: AuditActor | None = None,
) -> None:
    """Records an event about the call being served in `trail`."""
    await trail.record(
        event_from_call(
            trail.service,
            organization,
            resource,
            phi_fields_read=phi_fields_read,
            phi_fields_changed=phi_fields_changed,
            outcome=outcome,
            description=description,
            actor=actor,
        )
    )
