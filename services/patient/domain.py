"""Patients and their PHI: the only place in medmesh that holds patient-identifying data. No I/O.

A `Patient` is owned by one organization. Its PHI fields are named once, in `PHI_FIELDS`: that
tuple drives redaction, the audit trail's field names and the update-mask checks, so a new PHI
field cannot be added to one of them and forgotten in the others.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any

from medmesh.runtime.errors import InvalidArgument
from medmesh.runtime.resources import etag_of

ORGANIZATION_PREFIX = "organizations/"
COLLECTION = "/patients/"
ID_PATTERN = re.compile(r"^[a-z0-9-]{1,63}$")
DEVICE_PATTERN = re.compile(r"^devices/[A-Za-z0-9._-]{1,64}$")
# Shape only: a deliverable address is the mail system's business, not ours.
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
MAX_DEVICES = 100

# The PHI fields, by their protobuf names; `contact` counts as one field.
PHI_FIELDS = ("given_name", "family_name", "birth_date", "sex", "contact", "national_id")
CONTACT_FIELDS = ("email", "phone", "address")
NON_PHI_UPDATABLE_FIELDS = ("devices",)
# What an update mask may name: the PHI fields, parts of the contact, and `devices`.
UPDATABLE_FIELDS = (*PHI_FIELDS, *(f"contact.{f}" for f in CONTACT_FIELDS), *NON_PHI_UPDATABLE_FIELDS)

# (year, month, day) as a caller wrote it, google.type.Date style: all zero means "not given".
DateParts = tuple[int, int, int]
NO_DATE: DateParts = (0, 0, 0)

# Birth dates are local dates: one "today" in the easternmost time zone (UTC+14) is not in the future.
_EARLIEST_TIME_ZONE_AHEAD = timedelta(hours=14)


class Sex(StrEnum):
    FEMALE = "FEMALE"
    MALE = "MALE"
    OTHER = "OTHER"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class Contact:
    email: str = ""
    phone: str = ""
    address: str = ""

    @property
    def is_empty(self) -> bool:
        return not (self.email or self.phone or self.address)


@dataclass(frozen=True)
class PatientDetails:
    """What a caller writes: every field of a create, or the new values of an update's masked fields."""

    given_name: str = ""
    family_name: str = ""
    birth_date: DateParts = NO_DATE
    sex: Sex | None = None
    contact: Contact = field(default_factory=Contact)
    national_id: str = ""
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Patient:
    id: str  # opaque and random: says nothing about the patient
    organization: str  # owner, `organizations/{id}`
    given_name: str
    family_name: str
    birth_date: date | None
    sex: Sex | None
    contact: Contact
    national_id: str
    devices: tuple[str, ...]  # `devices/{id}`; not PHI
    create_time: datetime
    update_time: datetime
    revision: int = 1

    @property
    def name(self) -> str:
        return self.organization + COLLECTION + self.id

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)

    def phi_fields_with_values(self) -> tuple[str, ...]:
        """Names of the PHI fields that hold something, in `PHI_FIELDS` order; never the values."""
        return tuple(name for name in PHI_FIELDS if _has_value(getattr(self, name)))

    def without_phi(self) -> Patient:
        """The same record with every PHI field cleared: what callers who may not see PHI get."""
        return replace(self, **_PHI_CLEARED)

    def updated(self, changes: PatientDetails, fields: set[str], at: datetime) -> Patient:
        """Applies the fields of a resolved update mask (see `resolve_update_mask`)."""
        values: dict[str, Any] = {}
        if "given_name" in fields:
            values["given_name"] = changes.given_name.strip()
        if "family_name" in fields:
            values["family_name"] = changes.family_name.strip()
        if "birth_date" in fields:
            values["birth_date"] = require_birth_date(changes.birth_date, at)
        if "sex" in fields:
            values["sex"] = changes.sex
        if "national_id" in fields:
            values["national_id"] = changes.national_id.strip()
        if "devices" in fields:
            values["devices"] = require_devices(changes.devices)
        contact_parts = {p.removeprefix("contact.") for p in fields if p.startswith("contact.")}
        if "contact" in fields:
            contact_parts = set(CONTACT_FIELDS)
        if contact_parts:
            merged = {part: getattr(changes.contact, part) for part in contact_parts}
            values["contact"] = require_contact(replace(self.contact, **merged))
        return replace(self, **values, update_time=at, revision=self.revision + 1)


_PHI_CLEARED: dict[str, Any] = {
    "given_name": "",
    "family_name": "",
    "birth_date": None,
    "sex": None,
    "contact": Contact(),
    "national_id": "",
}


def _has_value(value: object) -> bool:
    if isinstance(value, Contact):
        return not value.is_empty
    return value is not None and value != ""


def new_patient_id() -> str:
    return uuid.uuid4().hex


def new_patient(organization: str, details: PatientDetails, at: datetime, patient_id: str = "") -> Patient:
    """A validated new patient of `organization`, created at `at`."""
    return Patient(
        id=patient_id or new_patient_id(),
        organization=organization,
        given_name=details.given_name.strip(),
        family_name=details.family_name.strip(),
        birth_date=require_birth_date(details.birth_date, at),
        sex=details.sex,
        contact=require_contact(details.contact),
        national_id=details.national_id.strip(),
        devices=require_devices(details.devices),
        create_time=at,
        update_time=at,
    )


def parse_parent(parent: str, field: str = "parent", *, allow_all: bool = False) -> str:
    """`organizations/{id}` (or `organizations/-` when `allow_all`) -> the same, checked."""
    organization_id = parent.removeprefix(ORGANIZATION_PREFIX)
    # `-` fits the id pattern but is the AIP-159 wildcard, never an organization.
    wildcard_allowed = organization_id != "-" or allow_all
    if parent.startswith(ORGANIZATION_PREFIX) and ID_PATTERN.match(organization_id) and wildcard_allowed:
        return parent
    raise InvalidArgument.for_field(
        field, f"must look like organizations/{{organization}}, got {parent!r}", reason="INVALID_NAME"
    )


def parse_name(name: str, field: str = "name") -> tuple[str, str]:
    """`organizations/{o}/patients/{p}` -> (`organizations/{o}`, p)."""
    organization, separator, patient_id = name.rpartition(COLLECTION)
    if separator and ID_PATTERN.match(patient_id):
        try:
            return parse_parent(organization, field), patient_id
        except InvalidArgument:
            pass
    raise InvalidArgument.for_field(
        field,
        f"must look like organizations/{{organization}}/patients/{{patient}}, got {name!r}",
        reason="INVALID_NAME",
    )


def require_birth_date(parts: DateParts, at: datetime, field: str = "patient.birth_date") -> date | None:
    """A complete, real calendar date not after today; all zeros means no birth date."""
    if parts == NO_DATE:
        return None
    year, month, day = parts
    try:
        birth_date = date(year, month, day)
    except ValueError as error:
        # The value is PHI: the message names the field only.
        raise InvalidArgument.for_field(field, "must be a real calendar date with year, month and day") from error
    if birth_date > (at + _EARLIEST_TIME_ZONE_AHEAD).date():
        raise InvalidArgument.for_field(field, "cannot be in the future")
    return birth_date


def require_contact(contact: Contact, field: str = "patient.contact") -> Contact:
    contact = Contact(contact.email.strip(), contact.phone.strip(), contact.address.strip())
    if contact.email and not EMAIL_PATTERN.match(contact.email):
        raise InvalidArgument.for_field(f"{field}.email", "must look like an e-mail address")
    return contact


def require_devices(devices: Iterable[str], field: str = "patient.devices") -> tuple[str, ...]:
    devices = tuple(devices)
    if len(devices) > MAX_DEVICES:
        raise InvalidArgument.for_field(field, f"at most {MAX_DEVICES} devices")
    for device in devices:
        if not DEVICE_PATTERN.match(device):
            raise InvalidArgument.for_field(field, f"must be device names like devices/{{device}}, got {device!r}")
    if len(set(devices)) != len(devices):
        raise InvalidArgument.for_field(field, "must not name a device twice")
    return devices


def phi_fields_named(paths: Iterable[str]) -> tuple[str, ...]:
    """The PHI fields an update mask touches, `contact.email` counting as `contact`, in `PHI_FIELDS` order."""
    touched = {path.split(".", 1)[0] for path in paths}
    return tuple(name for name in PHI_FIELDS if name in touched)
