"""The device registry: devices keyed by manufacturer serial, owned by an organization. No I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime

from medmesh.runtime.errors import InvalidArgument
from medmesh.runtime.resources import etag_of

NAME_PREFIX = "devices/"
SERIAL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ORGANIZATION_PATTERN = re.compile(r"^organizations/[a-z0-9-]{1,63}$")
UPDATABLE_FIELDS = ("display_name", "model", "organization")


@dataclass(frozen=True)
class Device:
    id: str  # the manufacturer serial number
    organization: str  # owner, `organizations/{id}`
    display_name: str
    model: str
    create_time: datetime
    update_time: datetime
    revision: int = 1

    @property
    def name(self) -> str:
        return NAME_PREFIX + self.id

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)

    def updated(self, changes: DeviceChanges, fields: set[str], at: datetime) -> Device:
        values = {f: getattr(changes, f).strip() for f in fields}
        if "organization" in values:
            values["organization"] = require_organization(values["organization"], "device.organization")
        return replace(self, **values, update_time=at, revision=self.revision + 1)


@dataclass(frozen=True)
class DeviceChanges:
    """New values for an update; only the fields in the update mask are applied."""

    display_name: str = ""
    model: str = ""
    organization: str = ""


def parse_name(name: str, field: str = "name") -> str:
    """`devices/{serial}` -> serial."""
    if not name.startswith(NAME_PREFIX) or not SERIAL_PATTERN.match(name[len(NAME_PREFIX) :]):
        raise InvalidArgument.for_field(
            field, f"must look like devices/{{serial}}, got {name!r}", reason="INVALID_NAME"
        )
    return name[len(NAME_PREFIX) :]


def require_serial(serial: str, field: str = "device_id") -> str:
    if not SERIAL_PATTERN.match(serial):
        raise InvalidArgument.for_field(
            field,
            "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            reason="INVALID_DEVICE_ID",
        )
    return serial


def require_organization(organization: str, field: str) -> str:
    if not organization:
        raise InvalidArgument.for_field(
            field, "is required: the organization that owns the device", reason="REQUIRED_FIELD"
        )
    if not ORGANIZATION_PATTERN.match(organization):
        raise InvalidArgument.for_field(field, "must look like organizations/{id}", reason="INVALID_NAME")
    return organization
