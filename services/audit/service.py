"""Use cases of the audit service: what a request means, independent of gRPC and MongoDB.

The audit service does not audit reads of audit events: that would append an event for every
page an auditor reads, about the trail itself. Access to the trail is limited to admins instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from medmesh.runtime.auth import current_principal
from medmesh.runtime.errors import PermissionDenied
from medmesh.runtime.filtering import Condition, Converter, parse_filter, rfc3339_timestamp
from medmesh.runtime.pagination import encode_token, page_request
from services.audit.domain import (
    ALL_ORGANIZATIONS,
    AuditEvent,
    not_found,
    parse_event_name,
    parse_outcome,
    parse_parent,
    require_reader,
)
from services.audit.repository import InsertResult


def _method(written: str) -> str:
    # Stored without the leading slash gRPC puts on the wire: accept both.
    return written.lstrip("/")


FILTER_FIELDS: dict[str, tuple[str, Converter]] = {
    "resource": ("resource", str),
    "actor": ("actor.subject", str),
    "method": ("method", _method),
    "outcome": ("outcome", parse_outcome),
    "event_time": ("event_time", rfc3339_timestamp),
}


class AuditEventStore(Protocol):
    """What the service needs of its repository; AuditEventRepository and the unit tests' fake provide it."""

    async def insert_batch(self, events: Sequence[AuditEvent]) -> InsertResult: ...
    async def get(self, organization: str, event_id: str) -> AuditEvent | None: ...
    async def list(self, conditions: Sequence[Condition], after: str | None, limit: int) -> list[AuditEvent]: ...


@dataclass(frozen=True)
class AuditEventPage:
    audit_events: list[AuditEvent]
    next_page_token: str


async def _list_page(
    store: AuditEventStore,
    filter_text: str,
    fields: Mapping[str, tuple[str, Converter]],
    page_size: int,
    page_token: str,
    scope: Sequence[Condition],
) -> tuple[list[AuditEvent], str]:
    """`medmesh.runtime.resources.list_page` for a store without revisions: the same opaque tokens,
    bound to filter and scope; the cursor is the last id returned, whichever way the store sorts."""
    conditions = [*scope, *parse_filter(filter_text, fields)]
    query = filter_text if not scope else f"{filter_text}\x00{scope!r}"
    page = page_request(page_size, page_token, query)
    items = await store.list(conditions, page.after, page.size + 1)
    if len(items) <= page.size:
        return items, ""
    kept = items[: page.size]
    return kept, encode_token(kept[-1].id, query)


class AuditService:
    def __init__(self, store: AuditEventStore) -> None:
        self._store = store

    async def get(self, name: str) -> AuditEvent:
        organization, event_id = parse_event_name(name)
        require_reader(current_principal(), organization)
        event = await self._store.get(organization, event_id)
        if event is None:
            raise not_found(organization, event_id)
        return event

    async def list_events(self, parent: str, filter_text: str, page_size: int, page_token: str) -> AuditEventPage:
        organization = parse_parent(parent)
        require_reader(current_principal(), organization)
        scope = [] if organization == ALL_ORGANIZATIONS else [Condition("organization", True, organization)]
        events, token = await _list_page(self._store, filter_text, FILTER_FIELDS, page_size, page_token, scope)
        return AuditEventPage(events, token)

    async def write(self, events: Sequence[AuditEvent]) -> InsertResult:
        """Ingest from other services: idempotent per event id."""
        principal = current_principal()
        # The authenticator admits only the mesh credential here; this guards against wiring mistakes.
        if not principal.is_internal:
            raise PermissionDenied(
                "audit events are written by services, with the mesh credential", reason="INTERNAL_ONLY"
            )
        return await self._store.insert_batch(events)
