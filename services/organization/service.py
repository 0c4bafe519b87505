"""Use cases of the organization service: what a request means, independent of gRPC and MongoDB."""

from __future__ import annotations

from dataclasses import dataclass

from medmesh.runtime.errors import NotFound
from medmesh.runtime.filtering import Converter
from medmesh.runtime.resources import (
    ResourceStore,
    check_etag,
    delete_checked,
    list_page,
    now,
    replace_checked,
    resolve_update_mask,
)
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
    def __init__(self, store: ResourceStore[Organization]) -> None:
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
        organizations, token = await list_page(self._store, filter_text, FILTER_FIELDS, page_size, page_token)
        return OrganizationPage(organizations, token)

    async def update(self, name: str, changes: OrganizationChanges, mask: list[str], etag: str) -> Organization:
        current = await self.get(name, "organization.name")
        check_etag(current.id, current.revision, etag)
        fields = resolve_update_mask(mask, UPDATABLE_FIELDS, "organization")
        updated = current.updated(changes, fields, now())
        return await replace_checked(self._store, updated, current)

    async def delete(self, name: str, etag: str) -> None:
        await delete_checked(self._store, await self.get(name), etag)
