"""Patient domain rules: names, validation, the PHI field list, redaction and masked updates. No I/O."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta

import pytest

from medmesh.patient.v1 import patient_service_pb2 as pb
from medmesh.runtime.errors import InvalidArgument
from services.patient.domain import (
    PHI_FIELDS,
    UPDATABLE_FIELDS,
    Contact,
    Patient,
    PatientDetails,
    Sex,
    new_patient,
    new_patient_id,
    parse_name,
    parse_parent,
    phi_fields_named,
    require_birth_date,
)

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ORG = "organizations/clinic-1"
FULL = PatientDetails(
    given_name=" Ada ",
    family_name="Lovelace",
    birth_date=(1815, 12, 10),
    sex=Sex.FEMALE,
    contact=Contact(" ada@example.org ", "+44 20 7946 0000", "12 St James's Square"),
    national_id="AB123456C",
    devices=("devices/SN-1", "devices/SN-2"),
)


def violation(error: InvalidArgument) -> str:
    assert len(error.field_violations) == 1, error.field_violations
    return error.field_violations[0].field


def test_phi_fields_are_the_protos_phi_fields_and_nothing_else() -> None:
    proto_fields = {f.name for f in pb.Patient.DESCRIPTOR.fields}
    assert set(PHI_FIELDS) <= proto_fields
    not_phi = {"name", "devices", "phi_withheld", "create_time", "update_time", "etag"}
    assert set(PHI_FIELDS) == proto_fields - not_phi


def test_every_phi_field_is_a_patient_attribute() -> None:
    attributes = {f.name for f in dataclasses.fields(Patient)}
    assert set(PHI_FIELDS) <= attributes


def test_new_patient_strips_and_keeps_every_field() -> None:
    patient = new_patient(ORG, FULL, AT, "p1")

    assert patient.name == "organizations/clinic-1/patients/p1"
    assert (patient.given_name, patient.family_name) == ("Ada", "Lovelace")
    assert patient.birth_date == date(1815, 12, 10)
    assert patient.sex is Sex.FEMALE
    assert patient.contact == Contact("ada@example.org", "+44 20 7946 0000", "12 St James's Square")
    assert patient.national_id == "AB123456C"
    assert patient.devices == ("devices/SN-1", "devices/SN-2")
    assert (patient.create_time, patient.update_time, patient.revision) == (AT, AT, 1)


def test_new_patient_ids_are_opaque_and_random() -> None:
    ids = {new_patient_id() for _ in range(50)}
    assert len(ids) == 50
    for patient_id in ids:
        parse_name(f"{ORG}/patients/{patient_id}")  # fits the API's name pattern
    assert new_patient(ORG, FULL, AT).id != new_patient(ORG, FULL, AT).id


def test_phi_fields_with_values_names_only_filled_fields_in_order() -> None:
    full = new_patient(ORG, FULL, AT, "p1")
    assert full.phi_fields_with_values() == PHI_FIELDS

    partial = new_patient(ORG, PatientDetails(family_name="Lovelace", contact=Contact(phone="1")), AT, "p2")
    assert partial.phi_fields_with_values() == ("family_name", "contact")

    assert new_patient(ORG, PatientDetails(devices=("devices/SN-1",)), AT, "p3").phi_fields_with_values() == ()


def test_without_phi_clears_every_phi_field_and_keeps_the_rest() -> None:
    patient = new_patient(ORG, FULL, AT, "p1")

    redacted = patient.without_phi()

    assert redacted.phi_fields_with_values() == ()
    for field in PHI_FIELDS:
        assert getattr(redacted, field) != getattr(patient, field), field
    assert (redacted.id, redacted.organization, redacted.devices) == (patient.id, ORG, patient.devices)
    assert (redacted.etag, redacted.revision, redacted.create_time) == (patient.etag, 1, AT)
    assert "Lovelace" not in repr(redacted)


@pytest.mark.parametrize(
    "parts",
    [(2023, 2, 30), (2020, 13, 1), (2020, 0, 0), (0, 5, 17), (2020, 5, 0), (-1, 1, 1), (10000, 1, 1)],
)
def test_birth_date_must_be_a_complete_real_date(parts: tuple[int, int, int]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        new_patient(ORG, PatientDetails(birth_date=parts), AT)

    assert violation(caught.value) == "patient.birth_date"
    assert caught.value.reason == "INVALID_FIELD"
    # The value is PHI: the message names the field, never echoes the date.
    assert caught.value.message == "patient.birth_date: must be a real calendar date with year, month and day"


def test_birth_date_in_the_future_is_rejected() -> None:
    later = AT.date() + timedelta(days=2)

    with pytest.raises(InvalidArgument) as caught:
        require_birth_date((later.year, later.month, later.day), AT)

    assert violation(caught.value) == "patient.birth_date"
    assert "future" in caught.value.field_violations[0].description


def test_birth_date_today_is_accepted_even_where_today_is_already_tomorrow_in_utc() -> None:
    assert require_birth_date((2026, 3, 1), AT) == date(2026, 3, 1)
    # 12:00 UTC is already the 2nd in UTC+14.
    assert require_birth_date((2026, 3, 2), AT) == date(2026, 3, 2)


def test_no_birth_date_is_none() -> None:
    assert require_birth_date((0, 0, 0), AT) is None


@pytest.mark.parametrize("email", ["ada", "ada@", "@example.org", "ada@example", "ada @example.org", "a@b@c.org"])
def test_email_must_look_like_an_address(email: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        new_patient(ORG, PatientDetails(contact=Contact(email=email)), AT)

    assert violation(caught.value) == "patient.contact.email"
    assert email not in caught.value.message


@pytest.mark.parametrize(
    "devices",
    [
        ("SN-1",),
        ("devices/",),
        ("devices/bad id",),
        ("devices/SN-1", "devices/SN-1"),
        tuple(f"devices/{i}" for i in range(101)),
    ],
)
def test_devices_must_be_unique_device_names(devices: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        new_patient(ORG, PatientDetails(devices=devices), AT)

    assert violation(caught.value) == "patient.devices"


@pytest.mark.parametrize(
    "parent", ["", "organizations/", "organizations/A", "orgs/a", "organizations/a/b", "organizations/-"]
)
def test_bad_parent_is_invalid_name(parent: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_parent(parent)

    assert caught.value.reason == "INVALID_NAME"
    assert violation(caught.value) == "parent"


def test_all_organizations_is_a_parent_only_where_allowed() -> None:
    assert parse_parent("organizations/-", allow_all=True) == "organizations/-"
    assert parse_parent("organizations/a", allow_all=True) == "organizations/a"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "patients/p1",
        "organizations/a/patients/",
        "organizations/a/patients/P1",
        "organizations/-/patients/p1",
        "organizations/a/devices/p1",
        "organizations/a/patients/p1/x",
        "x/organizations/a/patients/p1",
    ],
)
def test_bad_patient_name_is_invalid_name(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_name(name, "patient.name")

    assert caught.value.reason == "INVALID_NAME"
    assert violation(caught.value) == "patient.name"


def test_parse_name_splits_organization_and_id() -> None:
    assert parse_name("organizations/a-1/patients/0f3c") == ("organizations/a-1", "0f3c")


def test_updatable_fields_are_phi_contact_parts_and_devices() -> None:
    assert set(UPDATABLE_FIELDS) == {*PHI_FIELDS, "contact.email", "contact.phone", "contact.address", "devices"}


@pytest.mark.parametrize(
    ("paths", "phi"),
    [
        ({"devices"}, ()),
        ({"contact.email", "devices"}, ("contact",)),
        ({"contact", "contact.phone"}, ("contact",)),
        ({"national_id", "given_name"}, ("given_name", "national_id")),
        (set(UPDATABLE_FIELDS), PHI_FIELDS),
    ],
)
def test_phi_fields_named_by_a_mask(paths: set[str], phi: tuple[str, ...]) -> None:
    assert phi_fields_named(paths) == phi


def test_update_applies_only_the_masked_fields() -> None:
    patient = new_patient(ORG, FULL, AT, "p1")
    later = AT + timedelta(minutes=5)

    updated = patient.updated(PatientDetails(given_name=" Augusta ", national_id="X"), {"given_name"}, later)

    assert (updated.given_name, updated.national_id) == ("Augusta", "AB123456C")
    assert (updated.revision, updated.update_time, updated.create_time) == (2, later, AT)
    assert updated.etag != patient.etag


def test_update_of_one_contact_part_keeps_the_others() -> None:
    patient = new_patient(ORG, FULL, AT, "p1")

    updated = patient.updated(PatientDetails(contact=Contact(email="ada@lovelace.org")), {"contact.email"}, AT)

    assert updated.contact == Contact("ada@lovelace.org", "+44 20 7946 0000", "12 St James's Square")


def test_update_of_the_whole_contact_replaces_it() -> None:
    patient = new_patient(ORG, FULL, AT, "p1")

    updated = patient.updated(PatientDetails(contact=Contact(phone="5")), {"contact"}, AT)

    assert updated.contact == Contact(phone="5")


def test_update_can_clear_phi() -> None:
    patient = new_patient(ORG, FULL, AT, "p1")

    updated = patient.updated(PatientDetails(), set(UPDATABLE_FIELDS), AT)

    assert updated.phi_fields_with_values() == ()
    assert updated.devices == ()


def test_update_validates_only_masked_fields() -> None:
    patient = new_patient(ORG, FULL, AT, "p1")
    garbage = PatientDetails(birth_date=(2020, 2, 31), contact=Contact(email="nope"), devices=("devices/SN-9",))

    assert patient.updated(garbage, {"devices"}, AT).devices == ("devices/SN-9",)
    with pytest.raises(InvalidArgument) as caught:
        patient.updated(garbage, {"birth_date"}, AT)
    assert violation(caught.value) == "patient.birth_date"
    with pytest.raises(InvalidArgument) as caught:
        patient.updated(garbage, {"contact.email"}, AT)
    assert violation(caught.value) == "patient.contact.email"
