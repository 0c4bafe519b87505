"""Use cases of the organization service: what a request means, independent of gRPC and MongoDB."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import Role, current_principal
from medmesh.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from medmesh.runtime.filtering import Converter, parse_filter
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


def _only_one_manufacturer(field: str) -> InvalidArgument:
    return InvalidArgument.for_field(
        field, "the platform has one manufacturer organization; others are care providers", reason="KIND_NOT_ALLOWED"
    )


class OrganizationService:
    """Access: platform admins manage every organization; members see their own, and its admins
    rename it. The manufacturer organization exists from the first start and cannot be deleted."""

    def __init__(self, store: ResourceStore[Organization], trail: AuditTrail, manufacturer_id: str) -> None:
        self._store = store
        self._audit = trail
        self._manufacturer_id = manufacturer_id

    async def ensure_manufacturer(self, display_name: str) -> None:
        """Creates the manufacturer organization on first start; any instance may race to do it."""
        if await self._store.get(self._manufacturer_id) is not None:
            return
        at = now()
        manufacturer = Organization(
            self._manufacturer_id, display_name, OrganizationKind.MANUFACTURER, create_time=at, update_time=at
        )
        with contextlib.suppress(AlreadyExists):
            await self._store.insert(manufacturer)

    async def create(self, display_name: str, kind: OrganizationKind | None, organization_id: str = "") -> Organization:
        current_principal().require_role(Role.PLATFORM_ADMIN, action="create organizations")
        if kind is OrganizationKind.MANUFACTURER:
            raise _only_one_manufacturer("organization.kind")
        at = now()
        organization = Organization(
            id=organization_id or new_organization_id(),
            display_name=require_display_name(display_name, "organization.display_name"),
            kind=OrganizationKind.CARE_PROVIDER,
            create_time=at,
            update_time=at,
        )
        await self._store.insert(organization)
        await audit(self._audit, organization.name, organization.name)
        return organization

    async def get(self, name: str, field: str = "name") -> Organization:
        organization_id = parse_name(name, field)
        current_principal().require_access(NAME_PREFIX + organization_id)
        organization = await self._store.get(organization_id)
        if organization is None:
            raise _not_found(organization_id)
        return organization

    async def list_organizations(self, filter_text: str, page_size: int, page_token: str) -> OrganizationPage:
        principal = current_principal()
        if principal.sees_every_organization:
            organizations, token = await list_page(self._store, filter_text, FILTER_FIELDS, page_size, page_token)
            return OrganizationPage(organizations, token)
        # Everyone else belongs to exactly one organization: the list is that one, if it matches.
        conditions = parse_filter(filter_text, FILTER_FIELDS)
        own = await self._store.get(principal.organization.removeprefix(NAME_PREFIX))
        matching = [own] if own is not None and all(c.matches(own) for c in conditions) else []
        return OrganizationPage(matching, "")

    async def update(self, name: str, changes: OrganizationChanges, mask: list[str], etag: str) -> Organization:
        principal = current_principal()
        principal.require_role(Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, action="change organizations")
        current = await self.get(name, "organization.name")
        check_etag(current.id, current.revision, etag)
        fields = resolve_update_mask(mask, UPDATABLE_FIELDS, "organization")
        if "kind" in fields:
            principal.require_role(Role.PLATFORM_ADMIN, action="change an organization's kind")
            manufacturer = current.id == self._manufacturer_id
            if (changes.kind is OrganizationKind.MANUFACTURER) != manufacturer:
                raise _only_one_manufacturer("organization.kind")
        updated = current.updated(changes, fields, now())
        result = await replace_checked(self._store, updated, current)
        await audit(self._audit, result.name, result.name, description=f"changed {', '.join(sorted(fields))}")
        return result

    async def delete(self, name: str, etag: str) -> None:
        current_principal().require_role(Role.PLATFORM_ADMIN, action="delete organizations")
        current = await self.get(name)
        if current.id == self._manufacturer_id:
            raise FailedPrecondition(
                "the manufacturer organization cannot be deleted",
                reason="MANUFACTURER_ORGANIZATION",
                metadata={"organization": current.name},
            )
        await delete_checked(self._store, current, etag)
        await audit(self._audit, current.name, current.name)
