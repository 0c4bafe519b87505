"""Use cases of the device registry, independent of gRPC and MongoDB."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import Principal, Role, current_principal
from medmesh.runtime.directories import OrganizationDirectory, require_existing_organization
from medmesh.runtime.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
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
from services.device import status as status_domain
from services.device import twin
from services.device.domain import (
    ASSIGNMENT_FIELDS,
    NAME_PREFIX,
    UPDATABLE_FIELDS,
    Device,
    DeviceChanges,
    new_device_uid,
    next_assignment,
    parse_child_name,
    parse_name,
    require_care_organization,
    require_device_type,
    require_organization,
    require_patient_name,
    require_serial,
    require_version,
)
from services.device.patients import PatientDirectory
from services.device.status import DeviceStatus, StatusStore
from services.device.twin import ConfigStore, DesiredConfig, DesiredConfigNotifier, DeviceConfig

log = logging.getLogger(__name__)

FILTER_FIELDS: dict[str, tuple[str, Converter]] = {
    "organization": ("organization", str),
    "model": ("model", str),
    "display_name": ("display_name", str),
    "device_type": ("device_type", str),
    "firmware_version": ("firmware_version", str),
    "hardware_version": ("hardware_version", str),
    "care_organization": ("care_organization", str),
    "patient": ("patient", str),
}


@dataclass(frozen=True)
class DevicePage:
    devices: list[Device]
    next_page_token: str


# Who may do what with the devices an organization owns or was lent (platform admins: every
# organization's). Registry changes (update, delete) are the owner's; the assignment is the
# owner's and the care organization's; the configuration, which is how clinicians adjust a
# patient's device remotely, theirs too.
READERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR)
WRITERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.OPERATOR)
DELETERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN)
ASSIGNERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.OPERATOR)
CONFIGURERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.OPERATOR, Role.CLINICIAN)
# Concurrent configuration changes without an etag: how often to take the next version.
CONFIG_WRITE_ATTEMPTS = 3

T = TypeVar("T")


def _denied(principal: Principal, name: str) -> PermissionDenied:
    return PermissionDenied(
        f"{principal.subject} may not access {name}",
        reason="ORGANIZATION_ACCESS_DENIED",
        metadata={"resource": name},
    )


def may_see(principal: Principal, device: Device) -> bool:
    """Members of the owner and of the care organization; platform admins and internal callers."""
    if principal.sees_every_organization:
        return True
    return bool(principal.organization) and principal.organization in device.organizations


class DeviceService:
    """Devices belong to an organization: its members see them, its admins and operators manage
    them, and the manufacturer's platform admins see and manage every organization's devices.
    A device lent to a care organization is seen by that organization's members too, and its
    admins and operators assign it to their patients.

    Device names carry no organization, so a caller who is not a platform admin is told
    PERMISSION_DENIED for a device they may not see and for one that does not exist alike.

    `configs` and `statuses` serve the configuration twin and the status; `patients` checks
    patient assignments. A service started without them answers those calls UNAVAILABLE.
    `notifier` tells a connected device of a new desired configuration right away; without it
    the device gets it when it next connects.
    """

    def __init__(
        self,
        store: ResourceStore[Device],
        organizations: OrganizationDirectory,
        trail: AuditTrail,
        *,
        patients: PatientDirectory | None = None,
        configs: ConfigStore | None = None,
        statuses: StatusStore | None = None,
        notifier: DesiredConfigNotifier | None = None,
    ) -> None:
        self._store = store
        self._organizations = organizations
        self._audit = trail
        self._patients = patients
        self._configs = configs
        self._statuses = statuses
        self._notifier = notifier

    # --- the registry ----------------------------------------------------------------------------

    async def create(
        self,
        serial: str,
        organization: str,
        display_name: str,
        model: str,
        *,
        device_type: str = "",
        firmware_version: str = "",
        hardware_version: str = "",
    ) -> Device:
        principal = current_principal()
        principal.require_role(*WRITERS, action="register devices")
        require_serial(serial)
        require_organization(organization, "device.organization")
        device_type = require_device_type(device_type.strip())
        firmware_version = require_version(firmware_version.strip(), "device.firmware_version")
        hardware_version = require_version(hardware_version.strip(), "device.hardware_version")
        principal.require_access(organization, NAME_PREFIX + serial)
        await require_existing_organization(self._organizations, organization, "device.organization")
        at = now()
        device = Device(
            id=serial,
            organization=organization,
            display_name=display_name.strip(),
            model=model.strip(),
            create_time=at,
            update_time=at,
            device_type=device_type,
            firmware_version=firmware_version,
            hardware_version=hardware_version,
            uid=new_device_uid(),
        )
        try:
            await self._store.insert(device)
        except AlreadyExists:
            # Saying "exists" about a device the caller may not see would reveal it.
            existing = await self._store.get(serial)
            if not principal.sees_every_organization and (existing is None or not may_see(principal, existing)):
                raise _denied(principal, device.name) from None
            raise
        await audit(self._audit, organization, device.name)
        return device

    async def get(
        self, name: str, field: str = "name", roles: tuple[Role, ...] = READERS, *, owner_only: bool = False
    ) -> Device:
        """The device, if the caller has one of `roles` and may see it (with `owner_only`: as a
        member of the owner, not only of the care organization)."""
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
        if not may_see(principal, device):
            raise _denied(principal, device.name)
        if owner_only and not principal.can_access(device.organization):
            raise PermissionDenied(
                f"{principal.subject} may not change {device.name}: only its owner may",
                reason="OWNER_ONLY",
                metadata={"resource": device.name},
            )
        return device

    async def list_devices(self, filter_text: str, page_size: int, page_token: str) -> DevicePage:
        principal = current_principal()
        principal.require_role(*READERS, action="list devices")
        # `organizations` holds the owner and the care organization: either makes a device visible.
        scope = [] if principal.sees_every_organization else [Condition("organizations", True, principal.organization)]
        devices, token = await list_page(self._store, filter_text, FILTER_FIELDS, page_size, page_token, scope)
        return DevicePage(devices, token)

    async def update(self, name: str, changes: DeviceChanges, mask: list[str], etag: str) -> Device:
        principal = current_principal()
        current = await self.get(name, "device.name", WRITERS, owner_only=True)
        check_etag(current.id, current.revision, etag)
        assignment_fields = sorted(set(mask) & set(ASSIGNMENT_FIELDS))
        if assignment_fields:
            raise InvalidArgument.for_field(
                "update_mask",
                f"{', '.join(assignment_fields)} change through {current.name}:assign and :unassign",
                reason="FIELD_NOT_UPDATABLE",
            )
        fields = resolve_update_mask(mask, UPDATABLE_FIELDS, "device")
        updated = current.updated(changes, fields, now())
        if updated.organization != current.organization:
            principal.require_role(Role.PLATFORM_ADMIN, action="move devices between organizations")
            await require_existing_organization(self._organizations, updated.organization, "device.organization")
        result = await replace_checked(self._store, updated, current)
        changed = result.changed_fields(current, fields)
        description = f"changed {', '.join(changed)}" if changed else "no field changed"
        await audit(self._audit, result.organization, result.name, description=description)
        return result

    async def delete(self, name: str, etag: str) -> None:
        current = await self.get(name, roles=DELETERS, owner_only=True)
        await delete_checked(self._store, current, etag)
        await audit(self._audit, current.organization, current.name)
        await self._forget_state(current)

    # --- the assignment --------------------------------------------------------------------------

    async def assign(self, name: str, care_organization: str, patient: str, etag: str) -> Device:
        """Lends the device to a care organization and/or assigns it to a patient of its data
        organization. Members of the care organization may assign their patients, not lend the
        device on. Assigning what is already assigned changes nothing and records nothing."""
        principal = current_principal()
        principal.require_role(*ASSIGNERS, action="assign devices")
        if care_organization:
            require_care_organization(care_organization)
        if patient:
            require_patient_name(patient)
        current = await self.get(name, roles=ASSIGNERS)
        check_etag(current.id, current.revision, etag)
        as_owner = principal.can_access(current.organization)
        if not as_owner and care_organization and care_organization != current.care_organization:
            raise PermissionDenied(
                f"{principal.subject} may assign {current.name} to patients of {current.care_organization}, "
                "not lend it to another organization",
                reason="CARE_ORGANIZATION_CHANGE_DENIED",
                metadata={"resource": current.name, "organization": current.care_organization},
            )
        target = next_assignment(current, care_organization, patient)
        if (target.care_organization, target.patient) == (current.care_organization, current.patient):
            return current
        if target.care_organization and target.care_organization != current.care_organization:
            await require_existing_organization(self._organizations, target.care_organization, "care_organization")
        if patient and patient != current.patient:
            await self._require_existing_patient(patient)
        updated = current.assigned(target.care_organization, target.patient, now())
        result = await replace_checked(self._store, updated, current)
        await audit(self._audit, result.organization, result.name, description=_describe_assignment(result))
        return result

    async def unassign(self, name: str, patient_only: bool, etag: str) -> Device:
        """Ends the patient assignment and, unless `patient_only`, the loan to the care organization
        (which the care organization may do too: it gives the device back)."""
        principal = current_principal()
        principal.require_role(*ASSIGNERS, action="unassign devices")
        current = await self.get(name, roles=ASSIGNERS)
        check_etag(current.id, current.revision, etag)
        care_organization = current.care_organization if patient_only else ""
        if (care_organization, "") == (current.care_organization, current.patient):
            return current
        updated = current.assigned(care_organization, "", now())
        result = await replace_checked(self._store, updated, current)
        await audit(self._audit, result.organization, result.name, description=_describe_assignment(result))
        return result

    # --- the configuration twin ------------------------------------------------------------------

    async def get_config(self, name: str) -> DeviceConfig:
        serial = parse_child_name(name, twin.COLLECTION)
        device = await self.get(NAME_PREFIX + serial)
        configs = _wired(self._configs, "configuration store")
        desired = await configs.current_desired(device.state_key)
        return DeviceConfig(device.name, desired, await configs.reported(device.state_key))

    async def update_config(self, name: str, desired: Mapping[str, Any], mask: list[str], etag: str) -> DeviceConfig:
        """Makes `desired` (whole, or its top-level keys named `desired.<key>` in `mask`) the next
        desired version. With an etag, ABORTED if any other version was made since it was read."""
        field = "device_config.name"
        serial = parse_child_name(name, twin.COLLECTION, field)
        keys = twin.resolve_desired_mask(mask)
        device = await self.get(NAME_PREFIX + serial, field, CONFIGURERS)
        configs = _wired(self._configs, "configuration store")
        for _ in range(CONFIG_WRITE_ATTEMPTS):
            current = await configs.current_desired(device.state_key)
            version = current.version if current else 0
            check_etag(f"{device.name}/{twin.COLLECTION}", version, etag)
            values = twin.require_config(
                twin.merged_desired(current.values if current else {}, desired, keys), "device_config.desired"
            )
            if values == (current.values if current else {}):
                return DeviceConfig(device.name, current, await configs.reported(device.state_key))
            proposed = DesiredConfig(device.state_key, version + 1, values, now())
            try:
                await configs.insert_desired(proposed)
            except AlreadyExists:
                if etag:
                    raise Aborted(
                        "the configuration changed during the update; get it again and retry",
                        metadata={"resource": f"{device.name}/{twin.COLLECTION}"},
                    ) from None
                continue  # no etag: the caller asked for "this, whatever came before"
            # As soon as the version is stored, which is what the adapter will read.
            await self._notify_config(device)
            config = DeviceConfig(device.name, proposed, await configs.reported(device.state_key))
            # The device receives its configuration: audited under its data organization.
            await audit(
                self._audit,
                device.data_organization,
                config.name,
                description=f"desired configuration version {proposed.version}",
            )
            return config
        raise Aborted(
            "the configuration kept changing during the update; retry",
            metadata={"resource": f"{device.name}/{twin.COLLECTION}"},
        )

    # --- the status ------------------------------------------------------------------------------

    async def get_status(self, name: str) -> DeviceStatus:
        serial = parse_child_name(name, status_domain.COLLECTION)
        device = await self.get(NAME_PREFIX + serial)
        statuses = _wired(self._statuses, "status store")
        connections, parts = await asyncio.gather(
            statuses.connections(device.state_key), statuses.parts(device.state_key)
        )
        return DeviceStatus(device.name, connections.newest, parts)

    # --- helpers ---------------------------------------------------------------------------------

    async def _require_existing_patient(self, patient: str) -> None:
        patients = _wired(self._patients, "patient directory")
        if not await patients.exists(patient):
            raise FailedPrecondition(
                f"patient {patient!r} does not exist or is not visible to the caller",
                reason="PATIENT_NOT_FOUND",
                metadata={"patient": patient},
                field_violations=[FieldViolation("patient", "names a patient that does not exist")],
            )

    async def _notify_config(self, device: Device) -> None:
        if self._notifier is None:
            return
        try:
            await self._notifier.desired_config_changed(device.name)
        except Exception:  # a hint only: the device gets the configuration when it connects
            log.warning("could not notify %s of its desired configuration", device.name, exc_info=True)

    async def _forget_state(self, device: Device) -> None:
        """Drops the deleted device's twin and status. They are keyed by the registration's uid, so
        what a failure here leaves behind is unreachable garbage, never another registration's."""
        for store in (self._configs, self._statuses):
            if store is None:
                continue
            try:
                await store.delete_all(device.state_key)
            except Exception:  # the device is gone either way; its leftovers are unreachable
                log.warning("could not remove the state of deleted device %s", device.name, exc_info=True)


def _describe_assignment(device: Device) -> str:
    care = device.care_organization or "none"
    patient = device.patient or "none"
    return f"assignment: care organization {care}, patient {patient}"


def _wired(port: T | None, what: str) -> T:
    if port is None:
        raise Unavailable(f"this device service instance was started without its {what}", reason="NOT_CONFIGURED")
    return port
