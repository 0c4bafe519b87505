"""Use cases of the device registry, independent of gRPC and MongoDB."""

from __future__ import annotations

from dataclasses import dataclass

from medmesh.runtime.errors import FailedPrecondition, FieldViolation, NotFound
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


class DeviceService:
    def __init__(self, store: ResourceStore[Device], organizations: OrganizationDirectory) -> None:
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
        devices, token = await list_page(self._store, filter_text, FILTER_FIELDS, page_size, page_token)
        return DevicePage(devices, token)

    async def update(self, name: str, changes: DeviceChanges, mask: list[str], etag: str) -> Device:
        current = await self.get(name, "device.name")
        check_etag(current.id, current.revision, etag)
        fields = resolve_update_mask(mask, UPDATABLE_FIELDS, "device")
        updated = current.updated(changes, fields, now())
        if updated.organization != current.organization:
            await self._require_existing_organization(updated.organization, "device.organization")
        return await replace_checked(self._store, updated, current)

    async def delete(self, name: str, etag: str) -> None:
        await delete_checked(self._store, await self.get(name), etag)
