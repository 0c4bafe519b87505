"""Audit events as the audit service sees them: names, who may read them, filters. Plain Python, no I/O.

The event itself is `medmesh.runtime.audit.AuditEvent`, the type every service records: the
audit service stores exactly what it is handed, so it keeps no type of its own.
"""

from __future__ import annotations

import re

from medmesh.runtime.audit import AuditEvent, Outcome
from medmesh.runtime.audit_outbox import event_name, parse_event_name
from medmesh.runtime.auth import ALL_ORGANIZATIONS, Principal, Role
from medmesh.runtime.errors import InvalidArgument, NotFound

__all__ = [
    "ALL_ORGANIZATIONS",
    "AuditEvent",
    "Outcome",
    "event_name",
    "parse_event_name",
    "parse_outcome",
    "parse_parent",
    "require_reader",
]

_PARENT = re.compile(r"^organizations/([a-z0-9-]{1,63}|-)$")
READER_ROLES = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN)


def parse_parent(parent: str, field: str = "parent") -> str:
    """`organizations/{o}` or `organizations/-` (every organization), unchanged."""
    if not _PARENT.match(parent):
        raise InvalidArgument.for_field(
            field,
            f"must look like organizations/{{organization}} or organizations/-, got {parent!r}",
            reason="INVALID_NAME",
        )
    return parent


def parse_outcome(written: str) -> str:
    """Filter converter: `OUTCOME_SUCCEEDED` or `SUCCEEDED` -> the stored `SUCCEEDED`."""
    return Outcome(written.removeprefix("OUTCOME_")).value


def require_reader(principal: Principal, organization: str) -> None:
    """Platform admins read every organization's trail (and `organizations/-`); organization admins
    their own; every other role none. PERMISSION_DENIED, checked before any lookup."""
    principal.require_role(*READER_ROLES, action="read audit events")
    principal.require_access(organization)


def not_found(organization: str, event_id: str) -> NotFound:
    name = f"{organization}/auditEvents/{event_id}"
    return NotFound(f"audit event {name!r} does not exist", reason="AUDIT_EVENT_NOT_FOUND", metadata={"name": name})
