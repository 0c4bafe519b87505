"""Use cases of the organization service: what a request means, independent of gRPC and MongoDB."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from medmesh.runtime.errors import Aborted, NotFound
from medmesh.runtime.filtering import Condition, Converter, parse_filter
from medmesh.runtime.pagination import page_request
from medmesh.runtime.resources import check_etag, now, page_of, resolve_update_mask
from services.organization.domain import (
    NAME_PREFIX,
    UPDATABLE_FIELDS,
    Organization,
    OrganizationChanges,
    OrganizationKind,
    new_organization_id,
    parse_name,
    require_display_name,
)


def _kind(written: str) -> str:
    return OrganizationKind(written.removeprefix("KIND_")).value


FILTER_FIELDS: dict[str, tuple[str, Converter]] = {
    "display_name": ("display_name", str),
    "kind": ("kind", _kind),
}


class OrganizationStore(Protocol):
    async def insert(self, resource: Organization) -> None: ...
    async def get(self, resource_id: str) -> Organization | None: ...
    async def list(self, conditions: list[Condition], after: str | None, limit: int) -> list[Organization]: ...
    async def replace(self, resource: Organization, expected_revision: int) -> bool: ...
    async def delete(self, resource_id: str, expected_revision: int | None = None) -> bool: ...


@dataclass(frozen=True)
class OrganizationPage:
    organizations: list[Organization]
    next_page_token: str


def _not_found(organization_id: str) -> NotFound:
    return NotFound(
        f"organization {organization_id!r} does not exist",
        reason="ORGANIZATION_NOT_FOUND",
        metadata={"organization": NAME_PREFIX + organization_id},
    )


class OrganizationService:
    def __init__(self, store: OrganizationStore) -> None:
        self._store = store

    async def create(self, display_name: str, kind: OrganizationKind | None, organization_id: str = "") -> Organization:
        at = now()
        organization = Organization(
            id=organization_id or new_organization_id(),
            display_name=require_display_name(display_name, "organization.display_name"),
            kind=kind or OrganizationKind.CARE_PROVIDER,
            create_time=at,
            update_time=at,
        )
        await self._store.insert(organization)
        return organization

    async def get(self, name: str, field: str = "name") -> Organization:
        organization_id = parse_name(name, field)
        organization = await self._store.get(organization_id)
        if organization is None:
            raise _not_found(organization_id)
        return organization

    async def list_organizations(self, filter_text: str, page_size: int, page_token: str) -> OrganizationPage:
        conditions = parse_filter(filter_text, FILTER_FIELDS)
        page = page_request(page_size, page_token, filter_text)
        items = await self._store.list(conditions, page.after, page.size + 1)
        organizations, token = page_of(items, page, filter_text)
        return OrganizationPage(organizations, token)

    async def update(self, name: str, changes: OrganizationChanges, mask: list[str], etag: str) -> Organization:
        current = await self.get(name, "organization.name")
        check_etag(current.id, current.revision, etag)
        fields = resolve_update_mask(mask, UPDATABLE_FIELDS, "organization")
        updated = current.updated(changes, fields, now())
        if not await self._store.replace(updated, current.revision):
            raise Aborted("the organization changed during the update; retry", metadata={"organization": name})
        return updated

    async def delete(self, name: str, etag: str) -> None:
        current = await self.get(name)
        check_etag(current.id, current.revision, etag)
        if not await self._store.delete(current.id, current.revision):
            raise Aborted("the organization changed during the delete; retry", metadata={"organization": name})
