"""PatientService use cases against in-memory fakes: access per role, PHI disclosure, audit, CRUD."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import date
from typing import Any

import pytest

from medmesh.runtime.audit import AuditEvent, RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from medmesh.runtime.resources import now
from services.patient.domain import PHI_FIELDS, Contact, Patient, PatientDetails, Sex
from services.patient.service import DisclosedPatient, PatientService, disclose, may_see_phi
from tests.unit.fakes import FakeOrganizationDirectory, InMemoryRepository

ORG_A = "organizations/a"
ORG_B = "organizations/b"
HOME = "organizations/manufacturer"

ADA = PatientDetails(
    given_name="Ada",
    family_name="Lovelace",
    birth_date=(1815, 12, 10),
    sex=Sex.FEMALE,
    contact=Contact("ada@example.org", "+44 20 7946 0000", "12 St James's Square"),
    national_id="AB123456C",
    devices=("devices/SN-1",),
)
# Every PHI value the tests write; none may ever show up in an audit event.
PHI_VALUES = (
    "Ada",
    "Lovelace",
    "1815-12-10",
    "date(1815",
    "ada@example.org",
    "+44 20 7946 0000",
    "St James",
    "AB123456C",
    "Augusta",
    "Byron",
    "FEMALE",
)

P1 = "p1"  # seeded ids sort p1 < p2 < ... so listing order is predictable
NAME_A1 = f"{ORG_A}/patients/{P1}"
MISSING_A = f"{ORG_A}/patients/nobody"


def user(role: Role, organization: str = ORG_A, patient: str = "") -> Principal:
    return Principal(
        subject=f"{organization}/users/{role.value}", organization=organization, role=role, patient=patient
    )


PLATFORM_ADMIN = user(Role.PLATFORM_ADMIN, HOME)
ADMIN_A, ADMIN_B = user(Role.ORGANIZATION_ADMIN), user(Role.ORGANIZATION_ADMIN, ORG_B)
CLINICIAN_A, CLINICIAN_B = user(Role.CLINICIAN), user(Role.CLINICIAN, ORG_B)
OPERATOR_A, OPERATOR_B = user(Role.OPERATOR), user(Role.OPERATOR, ORG_B)
PATIENT_A1 = user(Role.PATIENT, patient=NAME_A1)  # the patient of record p1
PATIENT_A2 = user(Role.PATIENT, patient=f"{ORG_A}/patients/p2")  # another patient of the same organization
PATIENT_B = user(Role.PATIENT, ORG_B, patient=f"{ORG_B}/patients/p9")

ORG_DENIED = "ORGANIZATION_ACCESS_DENIED"
ROLE_DENIED = "ROLE_NOT_ALLOWED"
PHI = "phi"
WITHHELD = "withheld"
OK = "ok"


@pytest.fixture
def store() -> InMemoryRepository[Patient]:
    return InMemoryRepository("patient")


@pytest.fixture
def directory() -> FakeOrganizationDirectory:
    return FakeOrganizationDirectory({ORG_A, ORG_B})


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("patient")


@pytest.fixture
def service(
    store: InMemoryRepository[Patient], directory: FakeOrganizationDirectory, trail: RecordingAuditTrail
) -> PatientService:
    return PatientService(store, directory, trail)


@pytest.fixture(autouse=True)
def no_phi_in_any_audit_event(trail: RecordingAuditTrail) -> Iterator[None]:
    """Checked after every test in this file: events carry field names, never PHI values."""
    yield
    for event in trail.events:
        for value in PHI_VALUES:
            assert value not in repr(event), f"PHI value {value!r} leaked into {event!r}"


def a_patient(patient_id: str = P1, organization: str = ORG_A, **changes: Any) -> Patient:
    at = now()
    patient = Patient(
        id=patient_id,
        organization=organization,
        given_name="Ada",
        family_name="Lovelace",
        birth_date=date(1815, 12, 10),
        sex=Sex.FEMALE,
        contact=Contact("ada@example.org", "+44 20 7946 0000", "12 St James's Square"),
        national_id="AB123456C",
        devices=("devices/SN-1",),
        create_time=at,
        update_time=at,
    )
    return replace(patient, **changes)


def only_violation(error: DomainError) -> str:
    assert len(error.field_violations) == 1, error.field_violations
    return error.field_violations[0].field


def assert_phi_shown(shown: DisclosedPatient, expected: Patient) -> None:
    assert shown.phi_withheld is False
    assert shown.patient == expected


def assert_phi_withheld(shown: DisclosedPatient, expected: Patient) -> None:
    assert shown.phi_withheld is True
    assert shown.patient.phi_fields_with_values() == ()
    for field in PHI_FIELDS:
        assert getattr(shown.patient, field) in ("", None, Contact()), field
    # Everything that is not PHI is still there.
    assert (shown.patient.name, shown.patient.devices, shown.patient.etag) == (
        expected.name,
        expected.devices,
        expected.etag,
    )
    assert (shown.patient.create_time, shown.patient.update_time) == (expected.create_time, expected.update_time)


def only_event(trail: RecordingAuditTrail) -> AuditEvent:
    assert len(trail.events) == 1, trail.events
    return trail.events[0]


def principal_id(value: object) -> str:
    if isinstance(value, Principal):
        return value.subject + (f"[{value.patient}]" if value.patient else "")
    return str(value)


async def denied(call: Callable[[], Any], principal: Principal, reason: str) -> None:
    with acting_as(principal), pytest.raises(PermissionDenied) as caught:
        await call()
    assert caught.value.reason == reason
    assert caught.value.code == "PERMISSION_DENIED"


# --- create ---------------------------------------------------------------------------------------


async def test_clinician_creates_a_patient_and_sees_its_phi(
    service: PatientService,
    store: InMemoryRepository[Patient],
    directory: FakeOrganizationDirectory,
    trail: RecordingAuditTrail,
) -> None:
    with acting_as(CLINICIAN_A, "/medmesh.patient.v1.PatientService/CreatePatient", "10.0.0.7"):
        shown = await service.create(ORG_A, ADA)

    patient = shown.patient
    assert store.items == {patient.id: patient}
    assert_phi_shown(shown, patient)
    assert patient.name == f"{ORG_A}/patients/{patient.id}"
    assert len(patient.id) == 32
    assert all(c in "0123456789abcdef" for c in patient.id)
    assert (patient.given_name, patient.birth_date, patient.devices) == ("Ada", date(1815, 12, 10), ("devices/SN-1",))
    assert (patient.revision, patient.create_time) == (1, patient.update_time)
    assert directory.asked == [ORG_A]
    event = only_event(trail)
    assert (event.organization, event.resource, event.service) == (ORG_A, patient.name, "patient")
    assert event.phi_fields_changed == PHI_FIELDS
    assert event.phi_fields_read == PHI_FIELDS
    assert (event.actor.subject, event.actor.role) == (CLINICIAN_A.subject, "clinician")
    assert (event.method, event.source_ip) == ("medmesh.patient.v1.PatientService/CreatePatient", "10.0.0.7")


async def test_organization_admin_creates_a_patient_but_gets_it_back_without_phi(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    with acting_as(ADMIN_A):
        shown = await service.create(ORG_A, ADA)

    stored = store.items[shown.patient.id]
    assert stored.phi_fields_with_values() == PHI_FIELDS  # stored in full...
    assert_phi_withheld(shown, stored)  # ...but not shown to an admin
    event = only_event(trail)
    assert event.phi_fields_changed == PHI_FIELDS
    assert event.phi_fields_read == ()


async def test_create_audits_only_the_phi_fields_given(service: PatientService, trail: RecordingAuditTrail) -> None:
    with acting_as(CLINICIAN_A):
        await service.create(ORG_A, PatientDetails(family_name="Byron", contact=Contact(phone="1")))

    event = only_event(trail)
    assert event.phi_fields_changed == ("family_name", "contact")
    assert event.phi_fields_read == ("family_name", "contact")


async def test_two_creates_get_different_opaque_ids(service: PatientService) -> None:
    with acting_as(CLINICIAN_A):
        first = await service.create(ORG_A, ADA)
        second = await service.create(ORG_A, ADA)

    assert first.patient.id != second.patient.id
    assert "ada" not in first.patient.id.lower()


@pytest.mark.parametrize(
    ("principal", "reason"),
    [
        (ADMIN_A, OK),
        (CLINICIAN_A, OK),
        (OPERATOR_A, ROLE_DENIED),
        (PATIENT_A1, ROLE_DENIED),
        (PLATFORM_ADMIN, ROLE_DENIED),
        (ADMIN_B, ORG_DENIED),
        (CLINICIAN_B, ORG_DENIED),
        (OPERATOR_B, ORG_DENIED),
        (PATIENT_B, ORG_DENIED),
    ],
    ids=principal_id,
)
async def test_create_access(
    service: PatientService,
    store: InMemoryRepository[Patient],
    directory: FakeOrganizationDirectory,
    trail: RecordingAuditTrail,
    principal: Principal,
    reason: str,
) -> None:
    if reason == OK:
        with acting_as(principal):
            shown = await service.create(ORG_A, ADA)
        assert list(store.items) == [shown.patient.id]
        return
    await denied(lambda: service.create(ORG_A, ADA), principal, reason)
    assert store.items == {}
    assert directory.asked == []
    assert trail.events == []


async def test_create_in_an_organization_that_does_not_exist(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    ghost = "organizations/ghost"
    with acting_as(user(Role.CLINICIAN, ghost)), pytest.raises(FailedPrecondition) as caught:
        await service.create(ghost, ADA)

    assert caught.value.reason == "ORGANIZATION_NOT_FOUND"
    assert caught.value.metadata == {"organization": ghost}
    assert only_violation(caught.value) == "parent"
    assert store.items == {}
    assert trail.events == []


async def test_create_when_the_organization_service_is_unavailable(
    store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    service = PatientService(store, FakeOrganizationDirectory({ORG_A}, unavailable=True), trail)

    with acting_as(CLINICIAN_A), pytest.raises(Unavailable) as caught:
        await service.create(ORG_A, ADA)

    assert caught.value.reason == "ORGANIZATION_SERVICE_UNAVAILABLE"
    assert store.items == {}


@pytest.mark.parametrize(
    ("details", "field"),
    [
        (PatientDetails(birth_date=(2021, 2, 29)), "patient.birth_date"),
        (PatientDetails(birth_date=(1990, 0, 0)), "patient.birth_date"),
        (PatientDetails(birth_date=(2999, 1, 1)), "patient.birth_date"),
        (PatientDetails(contact=Contact(email="ada.example.org")), "patient.contact.email"),
        (PatientDetails(devices=("devices/SN-1", "devices/SN-1")), "patient.devices"),
        (PatientDetails(devices=("SN-1",)), "patient.devices"),
    ],
)
async def test_create_rejects_invalid_fields_naming_them(
    service: PatientService,
    store: InMemoryRepository[Patient],
    directory: FakeOrganizationDirectory,
    details: PatientDetails,
    field: str,
) -> None:
    with acting_as(CLINICIAN_A), pytest.raises(InvalidArgument) as caught:
        await service.create(ORG_A, details)

    assert only_violation(caught.value) == field
    assert store.items == {}
    assert directory.asked == []


@pytest.mark.parametrize("parent", ["", "a", "organizations/A", "organizations/-", "organizations/a/patients/p1"])
async def test_create_rejects_a_malformed_parent(service: PatientService, parent: str) -> None:
    with acting_as(CLINICIAN_A), pytest.raises(InvalidArgument) as caught:
        await service.create(parent, ADA)

    assert caught.value.reason == "INVALID_NAME"
    assert only_violation(caught.value) == "parent"


async def test_a_call_without_credentials_is_unauthenticated(
    service: PatientService, store: InMemoryRepository[Patient]
) -> None:
    store.put(a_patient())
    with acting_as(None):
        with pytest.raises(Unauthenticated):
            await service.create(ORG_A, ADA)
        with pytest.raises(Unauthenticated):
            await service.get(NAME_A1)
        with pytest.raises(Unauthenticated):
            await service.list_patients(ORG_A, "", 10, "")


# --- who sees PHI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "sees"),
    [
        (CLINICIAN_A, True),
        (PATIENT_A1, True),
        (CLINICIAN_B, False),
        (PATIENT_A2, False),
        (PATIENT_B, False),
        (ADMIN_A, False),
        (OPERATOR_A, False),
        (PLATFORM_ADMIN, False),
        (internal_principal("device"), False),
    ],
    ids=principal_id,
)
def test_only_clinicians_of_the_organization_and_the_patient_see_phi(principal: Principal, sees: bool) -> None:
    patient = a_patient()

    assert may_see_phi(principal, patient) is sees
    shown = disclose(principal, patient)
    assert shown.phi_withheld is not sees
    assert (shown.patient == patient) is sees


async def test_internal_callers_get_records_without_phi(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    patient = a_patient()
    store.put(patient)

    with acting_as(internal_principal("device")):
        assert_phi_withheld(await service.get(NAME_A1), patient)
        with pytest.raises(PermissionDenied) as caught:
            await service.update(NAME_A1, ADA, ["given_name"], "")

    assert caught.value.reason == "PHI_WRITE_DENIED"
    assert trail.events == []


# --- get ------------------------------------------------------------------------------------------

GET_MATRIX = [
    (CLINICIAN_A, PHI),
    (PATIENT_A1, PHI),
    (ADMIN_A, WITHHELD),
    (OPERATOR_A, WITHHELD),
    (PLATFORM_ADMIN, WITHHELD),
    (PATIENT_A2, "PATIENT_ACCESS_DENIED"),
    (ADMIN_B, ORG_DENIED),
    (CLINICIAN_B, ORG_DENIED),
    (OPERATOR_B, ORG_DENIED),
    (PATIENT_B, ORG_DENIED),
]


@pytest.mark.parametrize(("principal", "outcome"), GET_MATRIX, ids=principal_id)
async def test_get_access_and_phi_disclosure(
    service: PatientService,
    store: InMemoryRepository[Patient],
    trail: RecordingAuditTrail,
    principal: Principal,
    outcome: str,
) -> None:
    patient = a_patient()
    store.put(patient)

    if outcome in (PHI, WITHHELD):
        with acting_as(principal):
            shown = await service.get(NAME_A1)
        if outcome == PHI:
            assert_phi_shown(shown, patient)
            event = only_event(trail)
            assert (event.organization, event.resource) == (ORG_A, NAME_A1)
            assert event.phi_fields_read == PHI_FIELDS
            assert event.phi_fields_changed == ()
            assert event.actor.subject == principal.subject
        else:
            assert_phi_withheld(shown, patient)
            assert trail.events == []
        return

    await denied(lambda: service.get(NAME_A1), principal, outcome)
    # The same answer whether or not the patient exists: PERMISSION_DENIED comes before NOT_FOUND.
    await denied(lambda: service.get(MISSING_A), principal, outcome)
    assert trail.events == []


async def test_get_of_a_patient_that_does_not_exist(service: PatientService, trail: RecordingAuditTrail) -> None:
    with acting_as(CLINICIAN_A), pytest.raises(NotFound) as caught:
        await service.get(MISSING_A)

    assert caught.value.reason == "PATIENT_NOT_FOUND"
    assert caught.value.metadata == {"patient": MISSING_A}
    assert trail.events == []


@pytest.mark.parametrize("principal", [CLINICIAN_B, PLATFORM_ADMIN], ids=principal_id)
async def test_a_patient_id_under_another_organizations_name_does_not_exist(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail, principal: Principal
) -> None:
    store.put(a_patient(P1, ORG_A))

    with acting_as(principal), pytest.raises(NotFound):
        await service.get(f"{ORG_B}/patients/{P1}")

    assert trail.events == []


async def test_clinician_reading_a_patient_without_phi_records_no_read(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    store.put(a_patient().without_phi())

    with acting_as(CLINICIAN_A):
        shown = await service.get(NAME_A1)

    assert shown.phi_withheld is False
    assert trail.events == []


async def test_get_audits_only_the_phi_fields_that_hold_something(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    store.put(a_patient(given_name="", sex=None, contact=Contact(), birth_date=None))

    with acting_as(PATIENT_A1):
        await service.get(NAME_A1)

    assert only_event(trail).phi_fields_read == ("family_name", "national_id")


async def test_every_phi_read_is_a_new_event(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    store.put(a_patient())

    with acting_as(CLINICIAN_A):
        for _ in range(3):
            await service.get(NAME_A1)

    assert len(trail.events) == 3
    assert len({e.id for e in trail.events}) == 3


@pytest.mark.parametrize(
    "name", ["p1", "organizations/a", "organizations/a/patients/P1", "organizations/-/patients/p1"]
)
async def test_get_with_a_malformed_name_is_invalid(service: PatientService, name: str) -> None:
    with acting_as(CLINICIAN_A), pytest.raises(InvalidArgument) as caught:
        await service.get(name)

    assert caught.value.reason == "INVALID_NAME"
    assert only_violation(caught.value) == "name"


# --- list -----------------------------------------------------------------------------------------


def seed_two_organizations(store: InMemoryRepository[Patient]) -> None:
    """p1..p9; odd ids in organization a, even ones in b, so every page has to skip the other's."""
    for i in range(1, 10):
        store.put(a_patient(f"p{i}", ORG_A if i % 2 else ORG_B, devices=(f"devices/SN-{i % 3}",)))


async def all_pages(service: PatientService, parent: str, filter_text: str, page_size: int) -> list[list[str]]:
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await service.list_patients(parent, filter_text, page_size, token)
        pages.append([p.patient.id for p in page.patients])
        token = page.next_page_token
        if not token:
            return pages
        assert len(pages) < 100, "paging does not terminate"


LIST_MATRIX = [
    (CLINICIAN_A, PHI),
    (ADMIN_A, WITHHELD),
    (OPERATOR_A, WITHHELD),
    (PLATFORM_ADMIN, WITHHELD),
    (PATIENT_A1, ROLE_DENIED),
    (ADMIN_B, ORG_DENIED),
    (CLINICIAN_B, ORG_DENIED),
    (OPERATOR_B, ORG_DENIED),
    (PATIENT_B, ORG_DENIED),
]


@pytest.mark.parametrize(("principal", "outcome"), LIST_MATRIX, ids=principal_id)
async def test_list_access_scope_and_phi_disclosure(
    service: PatientService,
    store: InMemoryRepository[Patient],
    trail: RecordingAuditTrail,
    principal: Principal,
    outcome: str,
) -> None:
    seed_two_organizations(store)

    if outcome in (PHI, WITHHELD):
        with acting_as(principal):
            page = await service.list_patients(ORG_A, "", 10, "")
        assert [p.patient.id for p in page.patients] == ["p1", "p3", "p5", "p7", "p9"]
        assert page.next_page_token == ""
        for shown in page.patients:
            if outcome == PHI:
                assert_phi_shown(shown, store.items[shown.patient.id])
            else:
                assert_phi_withheld(shown, store.items[shown.patient.id])
        if outcome == PHI:
            assert [e.resource for e in trail.events] == [f"{ORG_A}/patients/p{i}" for i in (1, 3, 5, 7, 9)]
            assert all(e.phi_fields_read == PHI_FIELDS and e.phi_fields_changed == () for e in trail.events)
        else:
            assert trail.events == []
        return

    await denied(lambda: service.list_patients(ORG_A, "", 10, ""), principal, outcome)
    assert trail.events == []


@pytest.mark.parametrize(
    ("principal", "outcome"),
    [
        (PLATFORM_ADMIN, WITHHELD),
        (CLINICIAN_A, ORG_DENIED),
        (ADMIN_A, ORG_DENIED),
        (OPERATOR_A, ORG_DENIED),
        (PATIENT_A1, ORG_DENIED),
    ],
    ids=principal_id,
)
async def test_list_across_all_organizations(
    service: PatientService,
    store: InMemoryRepository[Patient],
    trail: RecordingAuditTrail,
    principal: Principal,
    outcome: str,
) -> None:
    seed_two_organizations(store)

    if outcome == WITHHELD:
        with acting_as(principal):
            pages = await all_pages(service, "organizations/-", "", 4)
            page = await service.list_patients("organizations/-", "", 50, "")
        assert pages == [["p1", "p2", "p3", "p4"], ["p5", "p6", "p7", "p8"], ["p9"]]
        assert all(shown.phi_withheld for shown in page.patients)
        assert trail.events == []
        return
    await denied(lambda: service.list_patients("organizations/-", "", 10, ""), principal, outcome)


async def test_list_pages_through_one_organization_without_gap_or_repeat(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    seed_two_organizations(store)

    with acting_as(CLINICIAN_B):
        pages = await all_pages(service, ORG_B, "", 3)

    assert pages == [["p2", "p4", "p6"], ["p8"]]
    # One read event per patient returned, page by page.
    assert [e.resource for e in trail.events] == [f"{ORG_B}/patients/p{i}" for i in (2, 4, 6, 8)]


async def test_list_audits_only_the_page_returned(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    seed_two_organizations(store)

    with acting_as(CLINICIAN_A):
        page = await service.list_patients(ORG_A, "", 2, "")

    assert [p.patient.id for p in page.patients] == ["p1", "p3"]
    assert [e.resource for e in trail.events] == [NAME_A1, f"{ORG_A}/patients/p3"]


async def test_list_records_no_read_for_patients_without_phi(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    store.put(a_patient("p1"))
    store.put(a_patient("p2").without_phi())
    store.put(a_patient("p3", national_id="", given_name=""))

    with acting_as(CLINICIAN_A):
        page = await service.list_patients(ORG_A, "", 10, "")

    assert len(page.patients) == 3
    assert [(e.resource, e.phi_fields_read) for e in trail.events] == [
        (NAME_A1, PHI_FIELDS),
        (f"{ORG_A}/patients/p3", ("family_name", "birth_date", "sex", "contact")),
    ]


async def test_page_tokens_are_bound_to_the_organization(
    service: PatientService, store: InMemoryRepository[Patient]
) -> None:
    seed_two_organizations(store)
    with acting_as(PLATFORM_ADMIN):
        first = await service.list_patients(ORG_A, "", 2, "")

        with pytest.raises(InvalidArgument) as caught:
            await service.list_patients(ORG_B, "", 2, first.next_page_token)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"
        with pytest.raises(InvalidArgument):
            await service.list_patients("organizations/-", "", 2, first.next_page_token)

        second = await service.list_patients(ORG_A, "", 2, first.next_page_token)
    assert [p.patient.id for p in second.patients] == ["p5", "p7"]


async def test_list_by_device_stays_in_the_organization(
    service: PatientService, store: InMemoryRepository[Patient]
) -> None:
    seed_two_organizations(store)  # devices/SN-1 is used by p1, p4, p7

    with acting_as(OPERATOR_A):
        page = await service.list_patients(ORG_A, 'devices = "devices/SN-1"', 10, "")
        other = await service.list_patients(ORG_A, "devices != devices/SN-1", 10, "")

    assert [p.patient.id for p in page.patients] == ["p1", "p7"]
    assert [p.patient.id for p in other.patients] == ["p3", "p5", "p9"]


@pytest.mark.parametrize(
    "filter_text",
    [
        'given_name = "Ada"',
        'family_name = "Lovelace"',
        'national_id = "AB123456C"',
        'contact.email = "ada@example.org"',
        "sex = SEX_FEMALE",
        'birth_date = "1815-12-10"',
        'organization = "organizations/b"',  # scope is not the caller's to lift
        'devices = "SN-1"',
    ],
)
async def test_list_cannot_filter_on_phi_or_anything_but_devices(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail, filter_text: str
) -> None:
    store.put(a_patient())

    with acting_as(CLINICIAN_A), pytest.raises(InvalidArgument) as caught:
        await service.list_patients(ORG_A, filter_text, 10, "")

    assert caught.value.reason == "INVALID_FILTER"
    assert only_violation(caught.value) == "filter"
    assert trail.events == []


# --- update ---------------------------------------------------------------------------------------

UPDATE_NON_PHI_MATRIX = [
    (ADMIN_A, OK),
    (CLINICIAN_A, OK),
    (OPERATOR_A, OK),
    (PATIENT_A1, ROLE_DENIED),
    (PLATFORM_ADMIN, ROLE_DENIED),
    (ADMIN_B, ORG_DENIED),
    (CLINICIAN_B, ORG_DENIED),
    (OPERATOR_B, ORG_DENIED),
    (PATIENT_B, ORG_DENIED),
]


@pytest.mark.parametrize(("principal", "outcome"), UPDATE_NON_PHI_MATRIX, ids=principal_id)
async def test_update_devices_access(
    service: PatientService,
    store: InMemoryRepository[Patient],
    trail: RecordingAuditTrail,
    principal: Principal,
    outcome: str,
) -> None:
    before = a_patient()
    store.put(before)
    changes = PatientDetails(given_name="Augusta", devices=("devices/SN-7", "devices/SN-8"))

    if outcome == OK:
        with acting_as(principal):
            shown = await service.update(NAME_A1, changes, ["devices"], before.etag)
        after = store.items[P1]
        assert after.devices == ("devices/SN-7", "devices/SN-8")
        assert after.given_name == "Ada"  # not in the mask
        assert after.revision == 2
        event = only_event(trail)
        assert event.phi_fields_changed == ()
        if principal is CLINICIAN_A:
            assert_phi_shown(shown, after)
            assert event.phi_fields_read == PHI_FIELDS
        else:
            assert_phi_withheld(shown, after)
            assert event.phi_fields_read == ()
        return

    await denied(lambda: service.update(NAME_A1, changes, ["devices"], ""), principal, outcome)
    await denied(lambda: service.update(MISSING_A, changes, ["devices"], ""), principal, outcome)
    assert store.items[P1] == before
    assert trail.events == []


UPDATE_PHI_MATRIX = [
    (CLINICIAN_A, OK),
    (ADMIN_A, "PHI_WRITE_DENIED"),
    (OPERATOR_A, "PHI_WRITE_DENIED"),
    (PATIENT_A1, ROLE_DENIED),
    (PLATFORM_ADMIN, ROLE_DENIED),
    (ADMIN_B, ORG_DENIED),
    (CLINICIAN_B, ORG_DENIED),
    (OPERATOR_B, ORG_DENIED),
    (PATIENT_B, ORG_DENIED),
]


@pytest.mark.parametrize("mask", [["given_name"], ["contact.email", "devices"], ["*"]])
@pytest.mark.parametrize(("principal", "outcome"), UPDATE_PHI_MATRIX, ids=principal_id)
async def test_update_phi_access(
    service: PatientService,
    store: InMemoryRepository[Patient],
    trail: RecordingAuditTrail,
    principal: Principal,
    outcome: str,
    mask: list[str],
) -> None:
    before = a_patient()
    store.put(before)
    changes = replace(ADA, given_name="Augusta", contact=Contact(email="augusta@example.org"))

    if outcome == OK:
        with acting_as(principal):
            shown = await service.update(NAME_A1, changes, mask, "")
        assert_phi_shown(shown, store.items[P1])
        assert store.items[P1].revision == 2
        assert len(trail.events) == 1
        return

    await denied(lambda: service.update(NAME_A1, changes, mask, ""), principal, outcome)
    await denied(lambda: service.update(MISSING_A, changes, mask, ""), principal, outcome)
    assert store.items[P1] == before
    assert trail.events == []


async def test_clinician_update_audits_the_phi_fields_changed_by_name(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    store.put(a_patient())
    changes = PatientDetails(given_name="Augusta", contact=Contact(email="augusta@example.org"))

    with acting_as(CLINICIAN_A):
        shown = await service.update(NAME_A1, changes, ["contact.email", "given_name"], "")

    assert shown.patient.given_name == "Augusta"
    assert shown.patient.contact == Contact("augusta@example.org", "+44 20 7946 0000", "12 St James's Square")
    event = only_event(trail)
    assert event.phi_fields_changed == ("given_name", "contact")
    assert event.phi_fields_read == PHI_FIELDS
    assert "augusta" not in repr(event).lower()


async def test_update_star_replaces_everything(service: PatientService, store: InMemoryRepository[Patient]) -> None:
    store.put(a_patient())

    with acting_as(CLINICIAN_A):
        shown = await service.update(NAME_A1, PatientDetails(family_name="Byron"), ["*"], "")

    assert shown.patient.phi_fields_with_values() == ("family_name",)
    assert shown.patient.devices == ()
    assert store.items[P1] == shown.patient


@pytest.mark.parametrize(
    ("mask", "reason"),
    [([], "EMPTY_UPDATE_MASK"), (["name"], "FIELD_NOT_UPDATABLE"), (["contact.fax"], "FIELD_NOT_UPDATABLE")],
)
async def test_update_with_a_bad_mask(
    service: PatientService, store: InMemoryRepository[Patient], mask: list[str], reason: str
) -> None:
    before = a_patient()
    store.put(before)

    with acting_as(CLINICIAN_A), pytest.raises(InvalidArgument) as caught:
        await service.update(NAME_A1, ADA, mask, "")

    assert caught.value.reason == reason
    assert only_violation(caught.value) == "update_mask"
    assert store.items[P1] == before


async def test_update_validates_the_masked_fields(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    before = a_patient()
    store.put(before)

    with acting_as(CLINICIAN_A), pytest.raises(InvalidArgument) as caught:
        await service.update(NAME_A1, PatientDetails(birth_date=(2020, 2, 30)), ["birth_date"], "")

    assert only_violation(caught.value) == "patient.birth_date"
    assert store.items[P1] == before
    assert trail.events == []


async def test_update_of_a_missing_patient_is_not_found(service: PatientService) -> None:
    with acting_as(CLINICIAN_A), pytest.raises(NotFound) as caught:
        await service.update(MISSING_A, ADA, ["devices"], "")

    assert caught.value.reason == "PATIENT_NOT_FOUND"


async def test_update_names_the_patient_field_when_the_name_is_bad(service: PatientService) -> None:
    with acting_as(CLINICIAN_A), pytest.raises(InvalidArgument) as caught:
        await service.update("organizations/a/patients/", ADA, ["devices"], "")

    assert only_violation(caught.value) == "patient.name"


async def test_update_with_a_stale_etag_is_aborted(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    stale = a_patient()
    store.put(stale)
    with acting_as(CLINICIAN_A):
        current = await service.update(NAME_A1, PatientDetails(family_name="Byron"), ["family_name"], stale.etag)
        trail.events.clear()

        with pytest.raises(Aborted) as caught:
            await service.update(NAME_A1, PatientDetails(family_name="King"), ["family_name"], stale.etag)

    assert caught.value.reason == "ETAG_MISMATCH"
    assert store.items[P1] == current.patient
    assert trail.events == []


class RacingRepository(InMemoryRepository[Patient]):
    """Another writer bumps the revision right after the service reads: its write must lose."""

    async def get(self, resource_id: str) -> Patient | None:
        current = await super().get(resource_id)
        if current is not None:
            self.put(replace(current, family_name="Byron", revision=current.revision + 1))
        return current


async def test_update_that_loses_a_race_is_aborted(
    directory: FakeOrganizationDirectory, trail: RecordingAuditTrail
) -> None:
    store = RacingRepository("patient")
    store.put(a_patient())

    with acting_as(CLINICIAN_A), pytest.raises(Aborted):
        await PatientService(store, directory, trail).update(NAME_A1, PatientDetails(), ["given_name"], "")

    assert store.items[P1].family_name == "Byron"
    assert trail.events == []


# --- delete ---------------------------------------------------------------------------------------

DELETE_MATRIX = [
    (ADMIN_A, OK),
    (CLINICIAN_A, OK),
    (OPERATOR_A, ROLE_DENIED),
    (PATIENT_A1, ROLE_DENIED),
    (PLATFORM_ADMIN, ROLE_DENIED),
    (ADMIN_B, ORG_DENIED),
    (CLINICIAN_B, ORG_DENIED),
    (OPERATOR_B, ORG_DENIED),
    (PATIENT_B, ORG_DENIED),
]


@pytest.mark.parametrize(("principal", "outcome"), DELETE_MATRIX, ids=principal_id)
async def test_delete_access(
    service: PatientService,
    store: InMemoryRepository[Patient],
    trail: RecordingAuditTrail,
    principal: Principal,
    outcome: str,
) -> None:
    patient = a_patient(contact=Contact(), sex=None)
    store.put(patient)

    if outcome == OK:
        with acting_as(principal):
            await service.delete(NAME_A1, patient.etag)
        assert store.items == {}
        event = only_event(trail)
        assert (event.organization, event.resource) == (ORG_A, NAME_A1)
        assert event.phi_fields_changed == ("given_name", "family_name", "birth_date", "national_id")
        assert event.phi_fields_read == ()
        with acting_as(principal), pytest.raises(NotFound):
            await service.delete(NAME_A1, "")
        return

    await denied(lambda: service.delete(NAME_A1, ""), principal, outcome)
    await denied(lambda: service.delete(MISSING_A, ""), principal, outcome)
    assert store.items == {P1: patient}
    assert trail.events == []


async def test_delete_with_a_stale_etag_is_aborted(
    service: PatientService, store: InMemoryRepository[Patient], trail: RecordingAuditTrail
) -> None:
    patient = a_patient(revision=3)
    store.put(patient)

    with acting_as(CLINICIAN_A), pytest.raises(Aborted) as caught:
        await service.delete(NAME_A1, replace(patient, revision=2).etag)

    assert caught.value.reason == "ETAG_MISMATCH"
    assert store.items == {P1: patient}
    assert trail.events == []


async def test_delete_of_another_organizations_patient_by_its_id_is_not_found(
    service: PatientService, store: InMemoryRepository[Patient]
) -> None:
    store.put(a_patient(P1, ORG_A))

    with acting_as(CLINICIAN_B), pytest.raises(NotFound):
        await service.delete(f"{ORG_B}/patients/{P1}", "")

    assert P1 in store.items


# --- the whole life of a patient, as the audit trail sees it ----------------------------------------


async def test_audit_trail_of_a_patients_life_has_names_and_never_values(
    service: PatientService, trail: RecordingAuditTrail
) -> None:
    with acting_as(ADMIN_A):
        created = await service.create(ORG_A, ADA)
    name = created.patient.name
    with acting_as(OPERATOR_A):
        await service.get(name)  # withheld: no event
        await service.list_patients(ORG_A, "", 10, "")  # withheld: no event
    with acting_as(CLINICIAN_A):
        await service.get(name)
        await service.list_patients(ORG_A, "", 10, "")
        await service.update(name, PatientDetails(given_name="Augusta"), ["given_name"], "")
    with acting_as(user(Role.PATIENT, patient=name)):
        await service.get(name)
    with acting_as(ADMIN_A):
        await service.delete(name, "")

    assert [(e.actor.role, e.phi_fields_read, e.phi_fields_changed) for e in trail.events] == [
        ("organization_admin", (), PHI_FIELDS),
        ("clinician", PHI_FIELDS, ()),
        ("clinician", PHI_FIELDS, ()),
        ("clinician", PHI_FIELDS, ("given_name",)),
        ("patient", PHI_FIELDS, ()),
        ("organization_admin", (), PHI_FIELDS),
    ]
    assert {e.resource for e in trail.events} == {name}
    assert {e.organization for e in trail.events} == {ORG_A}
    # The autouse fixture checks every event for PHI values as well; this one is specific.
    for event in trail.events:
        text = repr(event)
        assert "Augusta" not in text
        assert "AB123456C" not in text
