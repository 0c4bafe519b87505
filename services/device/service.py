"""Use cases of the device registry, independent of gRPC and MongoDB."""

from __future__ import annotations

from dataclasses import dataclass

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import Principal, Role, current_principal
from medmesh.runtime.errors import AlreadyExists, FailedPrecondition, FieldViolation, NotFound, PermissionDenied
from medmesh.runtime.filtering import Condition, Converter
from medmesh.runtime.resources import (
    ResourceStore,
    check_etag,
    delete_checked,
    list_page,
    now,
    replace_checked,
    resolve_update_mask,
)
from services.device.domain import (
    NAME_PREFIX,
    UPDATABLE_FIELDS,
    Device,
    DeviceChanges,
    parse_name,
    require_organization,
    require_serial,
)
from services.device.organizations import OrganizationDirectory

FILTER_FIELDS: dict[str, tuple[str, Converter]] = {
    "organization": ("organization", str),
    "model": ("model", str),
    "display_name": ("display_name", str),
}


@dataclass(frozen=True)
class DevicePage:
    devices: list[Device]
    next_page_token: str


# Who may do what with an organization's devices (platform admins: every organization's).
READERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR)
WRITERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.OPERATOR)
DELETERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN)


def _denied(principal: Principal, name: str) -> PermissionDenied:
    return PermissionDenied(
        f"{principal.subject} may not access {name}",
        reason="ORGANIZATION_ACCESS_DENIED",
        metadata={"resource": name},
    )


class DeviceService:
    """Devices belong to an organization: its members see them, its admins and operators manage
    them, and the manufacturer's platform admins see and manage every organization's devices.
    Device names carry no organization, so a caller who is not a platform admin is told
    PERMISSION_DENIED for another organization's device and for one that does not exist alike."""

    def __init__(self, store: ResourceStore[Device], organizations: OrganizationDirectory, trail: AuditTrail) -> None:
        self._store = store
        self._organizations = organizations
        self._audit = trail

    async def _require_existing_organization(self, organization: str, field: str) -> None:
        if not await self._organizations.exists(organization):
            raise FailedPrecondition(
                f"organization {organization!r} does not exist",
                reason="ORGANIZATION_NOT_FOUND",
                metadata={"organization": organization},
                field_violations=[FieldViolation(field, "names an organization that does not exist")],
            )

    async def create(self, serial: str, organization: str, display_name: str, model: str) -> Device:
        principal = current_principal()
        principal.require_role(*WRITERS, action="register devices")
        require_serial(serial)
        require_organization(organization, "device.organization")
        principal.require_access(organization, NAME_PREFIX + serial)
        await self._require_existing_organization(organization, "device.organization")
        at = now()
        device = Device(
            id=serial,
            organization=organization,
            display_name=display_name.strip(),
            model=model.strip(),
            create_time=at,
            update_time=at,
        )
        try:
            await self._store.insert(device)
        except AlreadyExists:
            # Saying "exists" about another organization's device would reveal it.
            existing = await self._store.get(serial)
            if not principal.sees_every_organization and (existing is None or existing.organization != organization):
                raise _denied(principal, device.name) from None
            raise
        await audit(self._audit, organization, device.name)
        return device

    async def get(self, name: str, field: str = "name", roles: tuple[Role, ...] = READERS) -> Device:
        principal = current_principal()
        principal.require_role(*roles, action="do this with devices")
        serial = parse_name(name, field)
        device = await self._store.get(serial)
        if device is None:
            if not principal.sees_every_organization:
                raise _denied(principal, NAME_PREFIX + serial)
            raise NotFound(
                f"device {serial!r} does not exist",
                reason="DEVICE_NOT_FOUND",
                metadata={"device": NAME_PREFIX + serial},
            )
        if not principal.can_access(device.organization):
            raise _denied(principal, device.name)
        return device

    async def list_devices(self, filter_text: str, page_size: int, page_token: str) -> DevicePage:
        principal = current_principal()
        principal.require_role(*READERS, action="list devices")
        scope = [] if principal.sees_every_organization else [Condition("organization", True, principal.organization)]
        devices, token = await list_page(self._store, filter_text, FILTER_FIELDS, page_size, page_token, scope)
        return DevicePage(devices, token)

    async def update(self, name: str, changes: DeviceChanges, mask: list[str], etag: str) -> Device:
        principal = current_principal()
        current = await self.get(name, "device.name", WRITERS)
        check_etag(current.id, current.revision, etag)
        fields = resolve_update_mask(mask, UPDATABLE_FIELDS, "device")
        updated = current.updated(changes, fields, now())
        if updated.organization != current.organization:
            principal.require_role(Role.PLATFORM_ADMIN, action="move devices between organizations")
            await self._require_existing_organization(updated.organization, "device.organization")
        result = await replace_checked(self._store, updated, current)
        await audit(self._audit, result.organization, result.name, description=f"changed {', '.join(sorted(fields))}")
        return result

    async def delete(self, name: str, etag: str) -> None:
        current = await self.get(name, roles=DELETERS)
        await delete_checked(self._store, current, etag)
        await audit(self._audit, current.organization, current.name)
