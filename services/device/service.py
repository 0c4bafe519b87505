"""Use cases of the device registry, independent of gRPC and MongoDB."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from medmesh.runtime.errors import Aborted, FailedPrecondition, FieldViolation, NotFound
from medmesh.runtime.filtering import Condition, parse_filter
from medmesh.runtime.pagination import page_request
from medmesh.runtime.resources import check_etag, now, page_of, resolve_update_mask
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

FILTER_FIELDS = {
    "organization": ("organization", str),
    "model": ("model", str),
    "display_name": ("display_name", str),
}


class DeviceStore(Protocol):
    async def insert(self, resource: Device) -> None: ...
    async def get(self, resource_id: str) -> Device | None: ...
    async def list(self, conditions: list[Condition], after: str | None, limit: int) -> list[Device]: ...
    async def replace(self, resource: Device, expected_revision: int) -> bool: ...
    async def delete(self, resource_id: str, expected_revision: int | None = None) -> bool: ...


@dataclass(frozen=True)
class DevicePage:
    devices: list[Device]
    next_page_token: str


class DeviceService:
    def __init__(self, store: DeviceStore, organizations: OrganizationDirectory) -> None:
        self._store = store
        self._organizations = organizations

    async def _require_existing_organization(self, organization: str, field: str) -> None:
        if not await self._organizations.exists(organization):
            raise FailedPrecondition(
                f"organization {organization!r} does not exist",
                reason="ORGANIZATION_NOT_FOUND",
                metadata={"organization": organization},
                field_violations=[FieldViolation(field, "names an organization that does not exist")],
            )

    async def create(self, serial: str, organization: str, display_name: str, model: str) -> Device:
        require_serial(serial)
        require_organization(organization, "device.organization")
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
        await self._store.insert(device)
        return device

    async def get(self, name: str, field: str = "name") -> Device:
        serial = parse_name(name, field)
        device = await self._store.get(serial)
        if device is None:
            raise NotFound(
                f"device {serial!r} does not exist",
                reason="DEVICE_NOT_FOUND",
                metadata={"device": NAME_PREFIX + serial},
            )
        return device

    async def list_devices(self, filter_text: str, page_size: int, page_token: str) -> DevicePage:
        conditions = parse_filter(filter_text, FILTER_FIELDS)
        page = page_request(page_size, page_token, filter_text)
        items = await self._store.list(conditions, page.after, page.size + 1)
        devices, token = page_of(items, page, filter_text)
        return DevicePage(devices, token)

    async def update(self, name: str, changes: DeviceChanges, mask: list[str], etag: str) -> Device:
        current = await self.get(name, "device.name")
        check_etag(current.id, current.revision, etag)
        fields = resolve_update_mask(mask, UPDATABLE_FIELDS, "device")
        updated = current.updated(changes, fields, now())
        if updated.organization != current.organization:
            await self._require_existing_organization(updated.organization, "device.organization")
        if not await self._store.replace(updated, current.revision):
            raise Aborted("the device changed during the update; retry", metadata={"device": name})
        return updated

    async def delete(self, name: str, etag: str) -> None:
        current = await self.get(name)
        check_etag(current.id, current.revision, etag)
        if not await self._store.delete(current.id, current.revision):
            raise Aborted("the device changed during the delete; retry", metadata={"device": name})
