"""The device registry: devices keyed by manufacturer serial, owned by an organization. No I/O.

A device may be lent to a care organization (`care_organization`) and assigned to one of the
patients of its data organization (`patient`, an opaque name: no PHI). The data organization,
`care_organization` if set and else the owner, owns what the device produces or receives.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, replace
from datetime import datetime

from medmesh.runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument
from medmesh.runtime.resources import etag_of

NAME_PREFIX = "devices/"
SERIAL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ORGANIZATION_PATTERN = re.compile(r"^organizations/[a-z0-9-]{1,63}$")
PATIENT_PATTERN = re.compile(r"^(organizations/[a-z0-9-]{1,63})/patients/[a-z0-9-]{1,63}$")
DEVICE_TYPE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_VERSION_LENGTH = 64
MAX_MODEL_LENGTH = 100
MAX_DISPLAY_NAME_LENGTH = 200
# What UpdateDevice may change. The assignment (`care_organization`, `patient`) is not among
# them: it has its own methods, rules and checks (`:assign`, `:unassign`).
UPDATABLE_FIELDS = ("display_name", "model", "organization", "device_type", "firmware_version", "hardware_version")
ASSIGNMENT_FIELDS = ("care_organization", "patient")


@dataclass(frozen=True)
class Device:
    id: str  # the manufacturer serial number
    organization: str  # owner, `organizations/{id}`
    display_name: str
    model: str
    create_time: datetime
    update_time: datetime
    revision: int = 1
    device_type: str = ""  # for example `infusion-pump`
    firmware_version: str = ""  # as registered; what the device reports is in its status
    hardware_version: str = ""
    care_organization: str = ""  # `organizations/{id}` the device is lent to, or ""
    patient: str = ""  # `organizations/{o}/patients/{p}` of the data organization, or ""
    # Tells registrations of the same serial apart: configuration and status are kept per
    # uid, so a serial deleted and registered again starts with neither.
    uid: str = ""

    @property
    def name(self) -> str:
        return NAME_PREFIX + self.id

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)

    @property
    def data_organization(self) -> str:
        """Owner of what the device produces or receives: the care organization, else the owner."""
        return self.care_organization or self.organization

    @property
    def organizations(self) -> tuple[str, ...]:
        """The organizations whose members may see the device: the owner and the care organization."""
        return (self.organization, self.care_organization) if self.care_organization else (self.organization,)

    @property
    def state_key(self) -> str:
        """Key of the device's configuration and status: its uid, or the serial for registrations
        made before uids existed."""
        return self.uid or self.id

    def updated(self, changes: DeviceChanges, fields: set[str], at: datetime) -> Device:
        values = {f: getattr(changes, f).strip() for f in fields}
        if "organization" in values:
            values["organization"] = require_organization(values["organization"], "device.organization")
        if "device_type" in values:
            values["device_type"] = require_device_type(values["device_type"], "device.device_type")
        for field in ("firmware_version", "hardware_version"):
            if field in values:
                values[field] = require_version(values[field], f"device.{field}")
        return replace(self, **values, update_time=at, revision=self.revision + 1)

    def changed_fields(self, other: Device, fields: set[str]) -> list[str]:
        """Which of `fields` differ between this device and `other`, sorted."""
        return sorted(f for f in fields if getattr(self, f) != getattr(other, f))

    def assigned(self, care_organization: str, patient: str, at: datetime) -> Device:
        return replace(
            self,
            care_organization=care_organization,
            patient=patient,
            update_time=at,
            revision=self.revision + 1,
        )


@dataclass(frozen=True)
class DeviceChanges:
    """New values for an update; only the fields in the update mask are applied."""

    display_name: str = ""
    model: str = ""
    organization: str = ""
    device_type: str = ""
    firmware_version: str = ""
    hardware_version: str = ""


@dataclass(frozen=True)
class Assignment:
    """Where an `:assign` leaves a device: its care organization and patient ("" for none)."""

    care_organization: str
    patient: str

    @property
    def patient_organization(self) -> str:
        match = PATIENT_PATTERN.match(self.patient)
        return match.group(1) if match else ""


def new_device_uid() -> str:
    return uuid.uuid4().hex


def parse_name(name: str, field: str = "name") -> str:
    """`devices/{serial}` -> serial."""
    if not name.startswith(NAME_PREFIX) or not SERIAL_PATTERN.match(name[len(NAME_PREFIX) :]):
        raise InvalidArgument.for_field(
            field, f"must look like devices/{{serial}}, got {name!r}", reason="INVALID_NAME"
        )
    return name[len(NAME_PREFIX) :]


def parse_child_name(name: str, collection: str, field: str = "name") -> str:
    """`devices/{serial}/{collection}` (a singleton such as `config`) -> serial."""
    suffix = "/" + collection
    if not name.endswith(suffix):
        raise InvalidArgument.for_field(
            field, f"must look like devices/{{serial}}/{collection}, got {name!r}", reason="INVALID_NAME"
        )
    try:
        return parse_name(name[: -len(suffix)], field)
    except InvalidArgument:
        raise InvalidArgument.for_field(
            field, f"must look like devices/{{serial}}/{collection}, got {name!r}", reason="INVALID_NAME"
        ) from None


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


def require_device_type(device_type: str, field: str = "device.device_type") -> str:
    if device_type and not DEVICE_TYPE_PATTERN.match(device_type):
        raise InvalidArgument.for_field(
            field,
            "1 to 63 lowercase letters, digits or '-', starting with a letter or digit, like infusion-pump",
            reason="INVALID_DEVICE_TYPE",
        )
    return device_type


def require_version(version: str, field: str) -> str:
    if len(version) > MAX_VERSION_LENGTH:
        raise InvalidArgument.for_field(field, f"at most {MAX_VERSION_LENGTH} characters")
    return version


def require_care_organization(organization: str, field: str = "care_organization") -> str:
    if not ORGANIZATION_PATTERN.match(organization):
        raise InvalidArgument.for_field(field, "must look like organizations/{id}", reason="INVALID_NAME")
    return organization


def require_patient_name(patient: str, field: str = "patient") -> str:
    if not PATIENT_PATTERN.match(patient):
        raise InvalidArgument.for_field(
            field, "must look like organizations/{organization}/patients/{patient}", reason="INVALID_NAME"
        )
    return patient


def next_assignment(device: Device, care_organization: str, patient: str) -> Assignment:
    """Where `:assign` with these request fields (each "" when not given) leaves `device`.

    A new care organization ends the patient assignment unless the request names a patient
    too: a patient of the previous care organization cannot stay with a device lent elsewhere.
    The patient must be one of the data organization's patients.
    """
    if not care_organization and not patient:
        raise InvalidArgument(
            "name a care_organization, a patient, or both",
            reason="NOTHING_TO_ASSIGN",
            field_violations=[
                FieldViolation("care_organization", "is empty"),
                FieldViolation("patient", "is empty"),
            ],
        )
    if care_organization:
        require_care_organization(care_organization)
    if patient:
        require_patient_name(patient)
    new_care = care_organization or device.care_organization
    kept_patient = device.patient if new_care == device.care_organization else ""
    assignment = Assignment(new_care, patient or kept_patient)
    data_organization = new_care or device.organization
    if patient and assignment.patient_organization != data_organization:
        raise FailedPrecondition(
            f"patient {patient!r} is not a patient of {data_organization!r}, where the device's data goes",
            reason="PATIENT_NOT_IN_DATA_ORGANIZATION",
            metadata={"patient": patient, "organization": data_organization},
            field_violations=[FieldViolation("patient", f"must be a patient of {data_organization}")],
        )
    return assignment
