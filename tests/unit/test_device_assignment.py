"""Lending devices to care organizations and assigning them to patients: who may, what must exist,
what the care organization's members may then do, and GetDeviceAssignment for the mesh.

HOME owns the devices; CARE is a care organization; OTHER is neither.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from medmesh.device.v1 import device_internal_service_pb2 as internal_pb
from medmesh.device.v1 import device_service_pb2 as pb
from medmesh.organization.v1 import organization_service_pb2_grpc as organization_pb_grpc
from medmesh.patient.v1 import patient_service_pb2_grpc as patient_pb_grpc
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Authenticator, Principal, Role, TokenVerifier, acting_as, internal_principal
from medmesh.runtime.clients import peer_channel
from medmesh.runtime.directories import GrpcOrganizationDirectory
from medmesh.runtime.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from medmesh.runtime.interceptors import RequestInterceptor
from medmesh.runtime.resources import now
from services.device.domain import Device, DeviceChanges
from services.device.internal import DeviceInternal
from services.device.internal_servicer import DeviceInternalServicer
from services.device.patients import GrpcPatientDirectory
from services.device.service import DeviceService
from services.device.servicer import DeviceServicer
from services.organization.domain import Organization, OrganizationKind
from services.organization.service import OrganizationService
from services.organization.servicer import OrganizationServicer
from services.patient.domain import Patient, PatientDetails, new_patient
from services.patient.service import PatientService
from services.patient.servicer import PatientServicer
from tests.unit.fakes import FakeOrganizationDirectory, InMemoryRepository
from tests.unit.test_device_fakes import FakePatientDirectory, InMemoryConfigStore, InMemoryStatusStore
from tests.unit.test_device_service import StaticKeys, with_token

MANUFACTURER = "organizations/manufacturer"
HOME = "organizations/home"
CARE = "organizations/care"
OTHER = "organizations/other"
HOME_PATIENT = f"{HOME}/patients/p-home"
CARE_PATIENT = f"{CARE}/patients/p-care"
CARE_PATIENT_2 = f"{CARE}/patients/p-care-2"


def member(role: Role, organization: str = HOME) -> Principal:
    organization = MANUFACTURER if role is Role.PLATFORM_ADMIN else organization
    return Principal(f"{organization}/users/{role.value}", organization, role)


ADMIN = member(Role.PLATFORM_ADMIN)
HOME_OPERATOR = member(Role.OPERATOR)
CARE_ADMIN = member(Role.ORGANIZATION_ADMIN, CARE)
CARE_OPERATOR = member(Role.OPERATOR, CARE)
CARE_CLINICIAN = member(Role.CLINICIAN, CARE)


def a_device(serial: str = "SN-1", organization: str = HOME, **values: Any) -> Device:
    at = now()
    return replace(Device(serial, organization, "Pump", "IP-7", at, at, uid=f"uid-{serial}"), **values)


@pytest.fixture
def store() -> InMemoryRepository[Device]:
    store: InMemoryRepository[Device] = InMemoryRepository("device")
    store.put(a_device())
    return store


@pytest.fixture
def directory() -> FakeOrganizationDirectory:
    return FakeOrganizationDirectory({MANUFACTURER, HOME, CARE, OTHER})


@pytest.fixture
def patients() -> FakePatientDirectory:
    return FakePatientDirectory({HOME_PATIENT, CARE_PATIENT, CARE_PATIENT_2})


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("device")


@pytest.fixture
def service(
    store: InMemoryRepository[Device],
    directory: FakeOrganizationDirectory,
    patients: FakePatientDirectory,
    trail: RecordingAuditTrail,
) -> DeviceService:
    return DeviceService(
        store, directory, trail, patients=patients, configs=InMemoryConfigStore(), statuses=InMemoryStatusStore()
    )


@pytest.fixture(autouse=True)
def _as_home_operator() -> Iterator[None]:
    with acting_as(HOME_OPERATOR):
        yield


def lend(store: InMemoryRepository[Device], care: str = CARE, patient: str = "", serial: str = "SN-1") -> Device:
    device = replace(store.items[serial], care_organization=care, patient=patient)
    store.put(device)
    return device


# --- lending and assigning ------------------------------------------------------------------------


async def test_the_owner_lends_a_device_and_the_care_organization_assigns_its_patient(
    service: DeviceService,
    store: InMemoryRepository[Device],
    directory: FakeOrganizationDirectory,
    patients: FakePatientDirectory,
    trail: RecordingAuditTrail,
) -> None:
    lent = await service.assign("devices/SN-1", CARE, "", "")
    with acting_as(CARE_ADMIN):
        assigned = await service.assign("devices/SN-1", "", CARE_PATIENT, lent.etag)

    assert (lent.care_organization, lent.patient, lent.data_organization) == (CARE, "", CARE)
    assert (assigned.care_organization, assigned.patient) == (CARE, CARE_PATIENT)
    assert assigned.organization == HOME  # lending does not change the owner
    assert store.items["SN-1"] == assigned
    assert assigned.revision == 3
    assert directory.asked == [CARE]
    assert patients.asked == [CARE_PATIENT]
    # One event per change, under the owner, by whoever made it.
    assert [(e.organization, e.resource, e.actor.subject) for e in trail.events] == [
        (HOME, "devices/SN-1", HOME_OPERATOR.subject),
        (HOME, "devices/SN-1", CARE_ADMIN.subject),
    ]
    assert trail.events[1].description == f"assignment: care organization {CARE}, patient {CARE_PATIENT}"
    assert trail.events[1].phi_fields_read == trail.events[1].phi_fields_changed == ()


async def test_lending_and_assigning_in_one_call(service: DeviceService, patients: FakePatientDirectory) -> None:
    with acting_as(ADMIN):
        device = await service.assign("devices/SN-1", CARE, CARE_PATIENT, "")

    assert (device.care_organization, device.patient) == (CARE, CARE_PATIENT)
    assert patients.asked == [CARE_PATIENT]


async def test_the_owner_assigns_its_own_patient_when_the_device_is_not_lent(service: DeviceService) -> None:
    device = await service.assign("devices/SN-1", "", HOME_PATIENT, "")

    assert (device.care_organization, device.patient, device.data_organization) == ("", HOME_PATIENT, HOME)


@pytest.mark.parametrize(
    ("care", "patient", "lent_to"),
    [
        ("", CARE_PATIENT, ""),  # the data organization is the owner: a care patient does not fit
        ("", HOME_PATIENT, CARE),  # lent: the owner's patient does not fit
        (OTHER, CARE_PATIENT, CARE),  # lent on to OTHER with a patient of CARE
    ],
)
async def test_the_patient_must_be_one_of_the_data_organizations(
    service: DeviceService,
    store: InMemoryRepository[Device],
    patients: FakePatientDirectory,
    trail: RecordingAuditTrail,
    care: str,
    patient: str,
    lent_to: str,
) -> None:
    before = lend(store, lent_to)

    with acting_as(ADMIN), pytest.raises(FailedPrecondition) as caught:
        await service.assign("devices/SN-1", care, patient, "")

    assert caught.value.reason == "PATIENT_NOT_IN_DATA_ORGANIZATION"
    assert [v.field for v in caught.value.field_violations] == ["patient"]
    assert store.items["SN-1"] == before
    assert patients.asked == []
    assert trail.events == []


async def test_a_new_care_organization_ends_the_patient_assignment(
    service: DeviceService, store: InMemoryRepository[Device]
) -> None:
    lend(store, CARE, CARE_PATIENT)

    device = await service.assign("devices/SN-1", OTHER, "", "")

    assert (device.care_organization, device.patient) == (OTHER, "")


async def test_assigning_another_patient_keeps_the_care_organization(
    service: DeviceService, store: InMemoryRepository[Device]
) -> None:
    lend(store, CARE, CARE_PATIENT)

    with acting_as(CARE_OPERATOR):
        device = await service.assign("devices/SN-1", CARE, CARE_PATIENT_2, "")

    assert (device.care_organization, device.patient) == (CARE, CARE_PATIENT_2)


async def test_assigning_what_is_assigned_changes_nothing_and_records_nothing(
    service: DeviceService,
    store: InMemoryRepository[Device],
    patients: FakePatientDirectory,
    directory: FakeOrganizationDirectory,
    trail: RecordingAuditTrail,
) -> None:
    before = lend(store, CARE, CARE_PATIENT)

    with acting_as(CARE_ADMIN):
        again = await service.assign("devices/SN-1", CARE, CARE_PATIENT, before.etag)

    assert again == before == store.items["SN-1"]
    assert (patients.asked, directory.asked, trail.events) == ([], [], [])


async def test_a_patient_that_does_not_exist_or_is_not_visible_is_failed_precondition(
    service: DeviceService, store: InMemoryRepository[Device], trail: RecordingAuditTrail
) -> None:
    before = lend(store, CARE)

    with acting_as(CARE_ADMIN), pytest.raises(FailedPrecondition) as caught:
        await service.assign("devices/SN-1", "", f"{CARE}/patients/ghost", "")

    assert caught.value.reason == "PATIENT_NOT_FOUND"
    assert caught.value.metadata == {"patient": f"{CARE}/patients/ghost"}
    assert [v.field for v in caught.value.field_violations] == ["patient"]
    assert store.items["SN-1"] == before
    assert trail.events == []


async def test_a_care_organization_that_does_not_exist_is_failed_precondition(
    service: DeviceService, store: InMemoryRepository[Device], trail: RecordingAuditTrail
) -> None:
    with acting_as(ADMIN), pytest.raises(FailedPrecondition) as caught:
        await service.assign("devices/SN-1", "organizations/ghost", "", "")

    assert caught.value.reason == "ORGANIZATION_NOT_FOUND"
    assert [v.field for v in caught.value.field_violations] == ["care_organization"]
    assert store.items["SN-1"].care_organization == ""
    assert trail.events == []


async def test_the_patient_directory_being_down_is_unavailable(
    store: InMemoryRepository[Device], directory: FakeOrganizationDirectory, trail: RecordingAuditTrail
) -> None:
    service = DeviceService(store, directory, trail, patients=FakePatientDirectory(unavailable=True))

    with pytest.raises(Unavailable) as caught:
        await service.assign("devices/SN-1", "", HOME_PATIENT, "")

    assert caught.value.reason == "PATIENT_SERVICE_UNAVAILABLE"
    assert store.items["SN-1"].patient == ""


async def test_a_service_started_without_a_patient_directory_says_so(
    store: InMemoryRepository[Device], directory: FakeOrganizationDirectory
) -> None:
    service = DeviceService(store, directory, RecordingAuditTrail())

    with pytest.raises(Unavailable) as caught:
        await service.assign("devices/SN-1", "", HOME_PATIENT, "")
    lent = await service.assign("devices/SN-1", CARE, "", "")  # lending needs no patient directory

    assert caught.value.reason == "NOT_CONFIGURED"
    assert lent.care_organization == CARE


@pytest.mark.parametrize(
    ("care", "patient", "reason", "fields"),
    [
        ("", "", "NOTHING_TO_ASSIGN", ["care_organization", "patient"]),
        ("care", "", "INVALID_NAME", ["care_organization"]),
        ("", "organizations/home/people/p", "INVALID_NAME", ["patient"]),
        ("", "devices/SN-1", "INVALID_NAME", ["patient"]),
    ],
)
async def test_malformed_assignments_are_invalid(
    service: DeviceService,
    store: InMemoryRepository[Device],
    trail: RecordingAuditTrail,
    care: str,
    patient: str,
    reason: str,
    fields: list[str],
) -> None:
    before = store.items["SN-1"]

    with pytest.raises(InvalidArgument) as caught:
        await service.assign("devices/SN-1", care, patient, "")

    assert caught.value.reason == reason
    assert [v.field for v in caught.value.field_violations] == fields
    assert store.items["SN-1"] == before
    assert trail.events == []


async def test_a_stale_etag_is_aborted(service: DeviceService, store: InMemoryRepository[Device]) -> None:
    stale = store.items["SN-1"].etag
    await service.assign("devices/SN-1", CARE, "", "")

    with pytest.raises(Aborted):
        await service.assign("devices/SN-1", OTHER, "", stale)
    with pytest.raises(Aborted):
        await service.unassign("devices/SN-1", False, stale)

    assert store.items["SN-1"].care_organization == CARE


async def test_an_assignment_that_loses_a_race_is_aborted(
    directory: FakeOrganizationDirectory, patients: FakePatientDirectory
) -> None:
    class Racing(InMemoryRepository[Device]):
        async def get(self, resource_id: str) -> Device | None:
            current = await super().get(resource_id)
            if current is not None:
                self.put(replace(current, care_organization=OTHER, revision=current.revision + 1))
            return current

    store = Racing("device")
    store.put(a_device())

    with pytest.raises(Aborted):
        await DeviceService(store, directory, RecordingAuditTrail(), patients=patients).assign(
            "devices/SN-1", CARE, "", ""
        )

    assert store.items["SN-1"].care_organization == OTHER


# --- unassigning ----------------------------------------------------------------------------------


async def test_unassign_patient_only_keeps_the_loan(
    service: DeviceService, store: InMemoryRepository[Device], trail: RecordingAuditTrail
) -> None:
    lend(store, CARE, CARE_PATIENT)

    with acting_as(CARE_OPERATOR):
        device = await service.unassign("devices/SN-1", True, "")

    assert (device.care_organization, device.patient) == (CARE, "")
    assert [(e.organization, e.description) for e in trail.events] == [
        (HOME, f"assignment: care organization {CARE}, patient none")
    ]


async def test_the_care_organization_gives_the_device_back_and_loses_sight_of_it(
    service: DeviceService, store: InMemoryRepository[Device]
) -> None:
    lend(store, CARE, CARE_PATIENT)

    with acting_as(CARE_ADMIN):
        device = await service.unassign("devices/SN-1", False, "")
        with pytest.raises(PermissionDenied):
            await service.get("devices/SN-1")

    assert (device.care_organization, device.patient) == ("", "")


async def test_unassigning_what_is_not_assigned_changes_nothing(
    service: DeviceService, store: InMemoryRepository[Device], trail: RecordingAuditTrail
) -> None:
    before = store.items["SN-1"]

    assert await service.unassign("devices/SN-1", False, "") == before
    lend(store, CARE)
    assert (await service.unassign("devices/SN-1", True, "")).revision == before.revision

    assert trail.events == []


# --- who may ----------------------------------------------------------------------------------------

ALLOWED = "ALLOWED"


@pytest.mark.parametrize(
    ("caller", "expected"),
    [
        (ADMIN, ALLOWED),
        (member(Role.ORGANIZATION_ADMIN), ALLOWED),
        (HOME_OPERATOR, ALLOWED),
        (member(Role.CLINICIAN), "ROLE_NOT_ALLOWED"),
        (member(Role.PATIENT), "ROLE_NOT_ALLOWED"),
        (CARE_ADMIN, ALLOWED),
        (CARE_OPERATOR, ALLOWED),
        (CARE_CLINICIAN, "ROLE_NOT_ALLOWED"),
        (member(Role.ORGANIZATION_ADMIN, OTHER), "ORGANIZATION_ACCESS_DENIED"),
        (member(Role.OPERATOR, OTHER), "ORGANIZATION_ACCESS_DENIED"),
    ],
    ids=lambda value: value.subject if isinstance(value, Principal) else value,
)
async def test_who_may_assign_and_unassign_a_lent_device(
    service: DeviceService,
    store: InMemoryRepository[Device],
    trail: RecordingAuditTrail,
    caller: Principal,
    expected: str,
) -> None:
    before = lend(store, CARE, CARE_PATIENT)

    with acting_as(caller):
        if expected != ALLOWED:
            with pytest.raises(PermissionDenied) as assigning:
                await service.assign("devices/SN-1", "", CARE_PATIENT_2, "")
            with pytest.raises(PermissionDenied) as unassigning:
                await service.unassign("devices/SN-1", True, "")
            assert assigning.value.reason == unassigning.value.reason == expected
            assert store.items["SN-1"] == before
            assert trail.events == []
            return
        assigned = await service.assign("devices/SN-1", "", CARE_PATIENT_2, "")
        unassigned = await service.unassign("devices/SN-1", True, "")

    assert assigned.patient == CARE_PATIENT_2
    assert unassigned.patient == ""
    assert len(trail.events) == 2


@pytest.mark.parametrize("caller", [CARE_ADMIN, CARE_OPERATOR], ids=lambda p: p.subject)
async def test_the_care_organization_may_not_lend_the_device_on(
    service: DeviceService, store: InMemoryRepository[Device], directory: FakeOrganizationDirectory, caller: Principal
) -> None:
    before = lend(store, CARE)

    with acting_as(caller), pytest.raises(PermissionDenied) as caught:
        await service.assign("devices/SN-1", OTHER, "", "")

    assert caught.value.reason == "CARE_ORGANIZATION_CHANGE_DENIED"
    assert store.items["SN-1"] == before
    assert directory.asked == []


@pytest.mark.parametrize("role", [Role.ORGANIZATION_ADMIN, Role.OPERATOR], ids=lambda r: r.value)
async def test_assigning_a_missing_device_is_what_assigning_a_foreign_one_is(
    service: DeviceService, store: InMemoryRepository[Device], role: Role
) -> None:
    store.put(a_device("SN-OTHER", OTHER))

    with acting_as(member(role)):
        with pytest.raises(PermissionDenied) as missing:
            await service.assign("devices/SN-404", CARE, "", "")
        with pytest.raises(PermissionDenied) as foreign:
            await service.assign("devices/SN-OTHER", CARE, "", "")
    with acting_as(ADMIN), pytest.raises(NotFound) as as_admin:
        await service.assign("devices/SN-404", CARE, "", "")

    assert missing.value.reason == foreign.value.reason == "ORGANIZATION_ACCESS_DENIED"
    assert as_admin.value.reason == "DEVICE_NOT_FOUND"


# --- what the care organization's members see and may do -------------------------------------------


@pytest.mark.parametrize("caller", [CARE_ADMIN, CARE_OPERATOR, CARE_CLINICIAN], ids=lambda p: p.subject)
async def test_care_organization_members_read_and_list_lent_devices(
    service: DeviceService, store: InMemoryRepository[Device], caller: Principal
) -> None:
    store.put(a_device("SN-2"))
    store.put(a_device("SN-3", OTHER))
    store.put(a_device("SN-4", CARE))
    lend(store, CARE, CARE_PATIENT)
    lend(store, CARE, serial="SN-3")

    with acting_as(caller):
        device = await service.get("devices/SN-1")
        page = await service.list_devices("", 10, "")
        by_patient = await service.list_devices(f'patient = "{CARE_PATIENT}"', 10, "")
        lent_only = await service.list_devices(f'care_organization = "{CARE}"', 10, "")
        with pytest.raises(PermissionDenied):
            await service.get("devices/SN-2")

    assert device.patient == CARE_PATIENT
    assert [d.id for d in page.devices] == ["SN-1", "SN-3", "SN-4"]
    assert [d.id for d in by_patient.devices] == ["SN-1"]
    assert [d.id for d in lent_only.devices] == ["SN-1", "SN-3"]


async def test_the_owner_keeps_seeing_a_lent_device(service: DeviceService, store: InMemoryRepository[Device]) -> None:
    lend(store, CARE, CARE_PATIENT)

    with acting_as(member(Role.CLINICIAN)):
        device = await service.get("devices/SN-1")
        page = await service.list_devices("", 10, "")

    assert device.care_organization == CARE
    assert [d.id for d in page.devices] == ["SN-1"]


@pytest.mark.parametrize("caller", [CARE_ADMIN, CARE_OPERATOR], ids=lambda p: p.subject)
async def test_care_organization_members_may_not_change_or_delete_the_registration(
    service: DeviceService, store: InMemoryRepository[Device], trail: RecordingAuditTrail, caller: Principal
) -> None:
    before = lend(store, CARE)

    with acting_as(caller):
        with pytest.raises(PermissionDenied) as updating:
            await service.update("devices/SN-1", DeviceChanges(model="X"), ["model"], "")
        with pytest.raises(DomainError) as deleting:
            await service.delete("devices/SN-1", "")

    assert updating.value.reason == "OWNER_ONLY"
    assert deleting.value.code == "PERMISSION_DENIED"
    assert store.items["SN-1"] == before
    assert trail.events == []


async def test_a_serial_lent_to_the_caller_is_already_there(
    service: DeviceService, store: InMemoryRepository[Device]
) -> None:
    lend(store, CARE)

    with acting_as(CARE_OPERATOR), pytest.raises(DomainError) as caught:
        await service.create("SN-1", CARE, "", "")

    assert caught.value.code == "ALREADY_EXISTS"  # the caller sees the device anyway


# --- the new registry fields ------------------------------------------------------------------------


async def test_create_and_update_the_new_fields(
    service: DeviceService, store: InMemoryRepository[Device], trail: RecordingAuditTrail
) -> None:
    created = await service.create(
        "SN-9", HOME, "Pump 9", "IP-7", device_type="infusion-pump", firmware_version=" 2.1.0 ", hardware_version="B"
    )
    updated = await service.update(
        "devices/SN-9",
        DeviceChanges(organization=HOME, firmware_version="2.2.0", hardware_version="B"),
        ["*"],
        created.etag,
    )

    assert (created.device_type, created.firmware_version, created.hardware_version) == ("infusion-pump", "2.1.0", "B")
    assert created.uid
    assert created.uid != store.items["SN-1"].uid
    assert (updated.firmware_version, updated.device_type, updated.uid) == ("2.2.0", "", created.uid)
    # The event says which values changed, not which fields the mask named.
    assert trail.events[-1].description == "changed device_type, display_name, firmware_version, model"
    with acting_as(ADMIN):
        page = await service.list_devices('device_type = "" AND firmware_version = "2.2.0"', 10, "")
    assert [d.id for d in page.devices] == ["SN-9"]


@pytest.mark.parametrize(
    ("changes", "mask", "field"),
    [
        (DeviceChanges(device_type="Infusion Pump"), ["device_type"], "device.device_type"),
        (DeviceChanges(firmware_version="x" * 65), ["firmware_version"], "device.firmware_version"),
    ],
)
async def test_bad_new_field_values_are_invalid(
    service: DeviceService, store: InMemoryRepository[Device], changes: DeviceChanges, mask: list[str], field: str
) -> None:
    before = store.items["SN-1"]

    with pytest.raises(InvalidArgument) as caught:
        await service.update("devices/SN-1", changes, mask, "")

    assert [v.field for v in caught.value.field_violations] == [field]
    assert store.items["SN-1"] == before


async def test_create_rejects_a_bad_device_type(service: DeviceService, store: InMemoryRepository[Device]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.create("SN-9", HOME, "", "", device_type="-pump")

    assert caught.value.reason == "INVALID_DEVICE_TYPE"
    assert "SN-9" not in store.items


@pytest.mark.parametrize("mask", [["care_organization"], ["patient"], ["model", "patient"]])
async def test_the_assignment_is_not_changed_by_update(
    service: DeviceService, store: InMemoryRepository[Device], mask: list[str]
) -> None:
    before = store.items["SN-1"]

    with pytest.raises(InvalidArgument) as caught:
        await service.update("devices/SN-1", DeviceChanges(model="X"), mask, "")

    assert caught.value.reason == "FIELD_NOT_UPDATABLE"
    assert ":assign" in caught.value.message
    assert store.items["SN-1"] == before


# --- servicer ---------------------------------------------------------------------------------------


async def test_servicer_assign_unassign_and_the_new_fields(service: DeviceService) -> None:
    servicer = DeviceServicer(service)
    created = await servicer.CreateDevice(
        pb.CreateDeviceRequest(
            device_id="SN-7",
            device=pb.Device(organization=HOME, device_type="infusion-pump", firmware_version="1.0", uid="ignored"),
        ),
        None,
    )
    updated = await servicer.UpdateDevice(
        pb.UpdateDeviceRequest(
            device=pb.Device(name="devices/SN-7", hardware_version="rev-C", care_organization=CARE),
            update_mask=field_mask_pb2.FieldMask(paths=["hardware_version"]),
        ),
        None,
    )
    assigned = await servicer.AssignDevice(
        pb.AssignDeviceRequest(name="devices/SN-7", care_organization=CARE, etag=updated.etag), None
    )
    unassigned = await servicer.UnassignDevice(pb.UnassignDeviceRequest(name="devices/SN-7"), None)

    assert (created.device_type, created.firmware_version) == ("infusion-pump", "1.0")
    assert created.uid
    assert created.uid != "ignored"
    assert (updated.hardware_version, updated.care_organization) == ("rev-C", "")
    assert (assigned.care_organization, assigned.patient) == (CARE, "")
    assert unassigned.care_organization == ""


# --- GetDeviceAssignment (internal) ----------------------------------------------------------------


async def test_get_device_assignment_for_the_mesh(store: InMemoryRepository[Device]) -> None:
    lend(store, CARE, CARE_PATIENT)
    store.put(a_device("SN-2"))
    servicer = DeviceInternalServicer(DeviceInternal(store, InMemoryConfigStore(), InMemoryStatusStore()))

    with acting_as(internal_principal("observation")):
        lent = await servicer.GetDeviceAssignment(internal_pb.GetDeviceAssignmentRequest(device="devices/SN-1"), None)
        own = await servicer.GetDeviceAssignment(internal_pb.GetDeviceAssignmentRequest(device="devices/SN-2"), None)
        with pytest.raises(NotFound) as missing:
            await servicer.GetDeviceAssignment(internal_pb.GetDeviceAssignmentRequest(device="devices/SN-404"), None)

    assert lent == internal_pb.DeviceAssignment(
        device="devices/SN-1", organization=HOME, care_organization=CARE, patient=CARE_PATIENT
    )
    assert own == internal_pb.DeviceAssignment(device="devices/SN-2", organization=HOME)
    assert missing.value.reason == "DEVICE_NOT_FOUND"


async def test_get_device_assignment_refuses_users(store: InMemoryRepository[Device]) -> None:
    internal = DeviceInternal(store, InMemoryConfigStore(), InMemoryStatusStore())

    with acting_as(ADMIN), pytest.raises(PermissionDenied) as caught:
        await internal.assignment("devices/SN-1")

    assert caught.value.reason == "INTERNAL_ONLY"


# --- the real directories, over gRPC with the caller's token --------------------------------------


async def _serve(add: object, servicer: object, domain: str) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[RequestInterceptor(domain, Authenticator(TokenVerifier(StaticKeys())))])
    add(servicer, server)  # type: ignore[operator]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def patient_address() -> AsyncIterator[str]:
    store: InMemoryRepository[Patient] = InMemoryRepository("patient")
    for name in (HOME_PATIENT, CARE_PATIENT):
        organization, _, patient_id = name.partition("/patients/")
        store.put(new_patient(organization, PatientDetails(given_name="Ada"), now(), patient_id))
    service = PatientService(store, FakeOrganizationDirectory({HOME, CARE}), RecordingAuditTrail("patient"))
    server, address = await _serve(
        patient_pb_grpc.add_PatientServiceServicer_to_server, PatientServicer(service), "patient.medmesh"
    )
    try:
        yield address
    finally:
        await server.stop(grace=None)


async def test_grpc_patient_directory_sees_what_the_caller_may_see(patient_address: str) -> None:
    async with peer_channel("patient", patient_address, caller="device") as channel:
        patients = GrpcPatientDirectory(channel)
        with acting_as(with_token(CARE_ADMIN)):
            assert await patients.exists(CARE_PATIENT) is True
            assert await patients.exists(f"{CARE}/patients/ghost") is False
            assert (
                await patients.exists(HOME_PATIENT) is False
            )  # another organization's: refused, told apart from nothing
        with acting_as(with_token(ADMIN)):
            assert await patients.exists(HOME_PATIENT) is True


async def test_grpc_patient_directory_that_cannot_ask_is_unavailable(patient_address: str) -> None:
    async with peer_channel("patient", patient_address, caller="device") as channel:
        with acting_as(CARE_ADMIN), pytest.raises(Unavailable) as caught:  # no token to forward
            await GrpcPatientDirectory(channel).exists(CARE_PATIENT)

    assert caught.value.reason == "PATIENT_SERVICE_UNAVAILABLE"
    assert "UNAUTHENTICATED" in caught.value.message


async def test_an_end_to_end_assignment_through_the_real_patient_service(
    patient_address: str, store: InMemoryRepository[Device], directory: FakeOrganizationDirectory
) -> None:
    lend(store, CARE)
    trail = RecordingAuditTrail("device")
    async with peer_channel("patient", patient_address, caller="device") as channel:
        service = DeviceService(store, directory, trail, patients=GrpcPatientDirectory(channel))
        with acting_as(with_token(CARE_OPERATOR)):
            device = await service.assign("devices/SN-1", "", CARE_PATIENT, "")
            with pytest.raises(FailedPrecondition) as caught:
                await service.assign("devices/SN-1", "", f"{CARE}/patients/ghost", "")

    assert device.patient == CARE_PATIENT
    assert caught.value.reason == "PATIENT_NOT_FOUND"
    assert len(trail.events) == 1


async def test_grpc_organization_directory_reports_a_refusal_as_permission_denied() -> None:
    store: InMemoryRepository[Organization] = InMemoryRepository("organization")
    store.put(Organization("care", "Care", OrganizationKind.CARE_PROVIDER, now(), now()))
    store.put(Organization("home", "Home", OrganizationKind.CARE_PROVIDER, now(), now()))
    service = OrganizationService(store, RecordingAuditTrail(), "manufacturer")
    server, address = await _serve(
        organization_pb_grpc.add_OrganizationServiceServicer_to_server,
        OrganizationServicer(service),
        "organization.medmesh",
    )
    try:
        async with peer_channel("organization", address, caller="device") as channel:
            organizations = GrpcOrganizationDirectory(channel)
            with acting_as(with_token(HOME_OPERATOR)), pytest.raises(PermissionDenied) as caught:
                await organizations.exists(CARE)
            with acting_as(with_token(ADMIN)):
                assert await organizations.exists(CARE) is True
    finally:
        await server.stop(grace=None)

    assert caught.value.reason == "ORGANIZATION_ACCESS_DENIED"
    assert caught.value.metadata == {"organization": CARE}
