"""PatientRepository's document mapping (the MongoDB round trip itself is the shared MongoRepository's)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any, cast

import pytest

from services.patient.domain import Contact, Patient, Sex
from services.patient.repository import PatientRepository

AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
PATIENT = Patient(
    id="0f3c",
    organization="organizations/a",
    given_name="Ada",
    family_name="Lovelace",
    birth_date=date(1815, 12, 10),
    sex=Sex.FEMALE,
    contact=Contact("ada@example.org", "+44 20 7946 0000", "12 St James's Square"),
    national_id="AB123456C",
    devices=("devices/SN-1", "devices/SN-2"),
    create_time=AT,
    update_time=AT,
    revision=3,
)


@pytest.fixture
def repository() -> PatientRepository:
    # The mapping needs no database; the repository only looks its collection up.
    return PatientRepository(cast(Any, {"patients": None}))


def test_document_shape(repository: PatientRepository) -> None:
    assert repository.to_document(PATIENT) == {
        "_id": "0f3c",
        "organization": "organizations/a",
        "given_name": "Ada",
        "family_name": "Lovelace",
        "birth_date": "1815-12-10",
        "sex": "FEMALE",
        "contact": {"email": "ada@example.org", "phone": "+44 20 7946 0000", "address": "12 St James's Square"},
        "national_id": "AB123456C",
        "devices": ["devices/SN-1", "devices/SN-2"],  # an array: `devices = X` matches any element
        "create_time": AT,
        "update_time": AT,
        "revision": 3,
    }


@pytest.mark.parametrize(
    "patient",
    [PATIENT, PATIENT.without_phi(), replace(PATIENT, devices=(), sex=Sex.UNKNOWN, contact=Contact(phone="1"))],
)
def test_round_trip(repository: PatientRepository, patient: Patient) -> None:
    assert repository.from_document(repository.to_document(patient)) == patient


def test_a_document_without_phi_keys_reads_as_a_patient_without_phi(repository: PatientRepository) -> None:
    document = {
        "_id": "0f3c",
        "organization": "organizations/a",
        "create_time": AT,
        "update_time": AT,
        "revision": 1,
    }

    patient = repository.from_document(document)

    assert patient.phi_fields_with_values() == ()
    assert patient.devices == ()
