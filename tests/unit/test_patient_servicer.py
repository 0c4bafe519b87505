"""The patient servicer: protobuf <-> domain, and the whole call path through the shared interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_status import rpc_status

from medmesh.patient.v1 import patient_service_pb2 as pb
from medmesh.patient.v1 import patient_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Authenticator, Principal, Role, TokenVerifier
from medmesh.runtime.interceptors import RequestInterceptor
from services.patient.domain import PHI_FIELDS, Contact, Patient, PatientDetails, Sex
from services.patient.service import DisclosedPatient, PatientService
from services.patient.servicer import PatientServicer, details_from_pb, to_pb
from tests.rich_status import unpack_details
from tests.unit.fakes import FakeOrganizationDirectory, InMemoryRepository

ORG_A = "organizations/a"
AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
PATIENT = Patient(
    id="p1",
    organization=ORG_A,
    given_name="Ada",
    family_name="Lovelace",
    birth_date=date(1815, 12, 10),
    sex=Sex.FEMALE,
    contact=Contact("ada@example.org", "+44 20 7946 0000", "12 St James's Square"),
    national_id="AB123456C",
    devices=("devices/SN-1", "devices/SN-2"),
    create_time=AT,
    update_time=AT,
    revision=4,
)


# --- conversions ----------------------------------------------------------------------------------


def test_to_pb_with_phi() -> None:
    message = to_pb(DisclosedPatient(PATIENT, phi_withheld=False))

    assert message.name == "organizations/a/patients/p1"
    assert (message.given_name, message.family_name, message.national_id) == ("Ada", "Lovelace", "AB123456C")
    assert (message.birth_date.year, message.birth_date.month, message.birth_date.day) == (1815, 12, 10)
    assert message.sex == pb.Patient.SEX_FEMALE
    assert (message.contact.email, message.contact.phone, message.contact.address) == (
        "ada@example.org",
        "+44 20 7946 0000",
        "12 St James's Square",
    )
    assert list(message.devices) == ["devices/SN-1", "devices/SN-2"]
    assert message.phi_withheld is False
    assert message.create_time.ToDatetime(tzinfo=UTC) == AT
    assert message.update_time.ToDatetime(tzinfo=UTC) == AT
    assert message.etag == PATIENT.etag


def test_to_pb_without_phi_sets_no_phi_field() -> None:
    message = to_pb(DisclosedPatient(PATIENT.without_phi(), phi_withheld=True))

    assert message.phi_withheld is True
    assert not message.HasField("birth_date")
    assert not message.HasField("contact")
    for field in PHI_FIELDS:
        assert not message.HasField(field) if field in {"birth_date", "contact"} else not getattr(message, field)
    assert list(message.devices) == ["devices/SN-1", "devices/SN-2"]
    assert message.etag == PATIENT.etag
    serialized = message.SerializeToString()
    assert b"Lovelace" not in serialized
    assert b"AB123456C" not in serialized


@pytest.mark.parametrize(
    ("sex", "pb_sex"),
    [
        (Sex.FEMALE, pb.Patient.SEX_FEMALE),
        (Sex.MALE, pb.Patient.SEX_MALE),
        (Sex.OTHER, pb.Patient.SEX_OTHER),
        (Sex.UNKNOWN, pb.Patient.SEX_UNKNOWN),
        (None, pb.Patient.SEX_UNSPECIFIED),
    ],
)
def test_sex_round_trip(sex: Sex | None, pb_sex: int) -> None:
    assert to_pb(DisclosedPatient(replace(PATIENT, sex=sex), phi_withheld=False)).sex == pb_sex
    assert details_from_pb(pb.Patient(sex=pb_sex)).sex == sex  # type: ignore[arg-type]


def test_details_from_pb() -> None:
    message = to_pb(DisclosedPatient(PATIENT, phi_withheld=False))

    details = details_from_pb(message)

    assert details == PatientDetails(
        given_name="Ada",
        family_name="Lovelace",
        birth_date=(1815, 12, 10),
        sex=Sex.FEMALE,
        contact=PATIENT.contact,
        national_id="AB123456C",
        devices=("devices/SN-1", "devices/SN-2"),
    )


def test_details_from_an_empty_message_are_empty() -> None:
    assert details_from_pb(pb.Patient()) == PatientDetails()


# --- over gRPC, through the shared interceptor ----------------------------------------------------


class HeaderAuthenticator(Authenticator):
    """Stands in for token verification: the test names the caller in metadata."""

    principals: ClassVar[dict[str, Principal]] = {
        "clinician": Principal("organizations/a/users/c", ORG_A, Role.CLINICIAN),
        "operator": Principal("organizations/a/users/o", ORG_A, Role.OPERATOR),
        "outsider": Principal("organizations/b/users/c", "organizations/b", Role.CLINICIAN),
    }

    def __init__(self) -> None:
        super().__init__(TokenVerifier(keys=None))  # type: ignore[arg-type]

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal | None:
        return self.principals[metadata["x-test-caller"]]


@pytest.fixture
async def grpc_patients() -> AsyncIterator[tuple[Any, RecordingAuditTrail]]:
    trail = RecordingAuditTrail("patient")
    service = PatientService(InMemoryRepository("patient"), FakeOrganizationDirectory({ORG_A}), trail)
    server = grpc.aio.server(interceptors=[RequestInterceptor("patient.medmesh", HeaderAuthenticator())])
    pb_grpc.add_PatientServiceServicer_to_server(PatientServicer(service), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.PatientServiceStub(channel), trail  # type: ignore[no-untyped-call]
    finally:
        await server.stop(grace=None)


def as_(caller: str) -> list[tuple[str, str]]:
    return [("x-test-caller", caller)]


async def call_error(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)
    assert status is not None
    infos, bad_requests = unpack_details(status)
    assert len(infos) == 1
    assert infos[0].domain == "patient.medmesh"
    fields = [v.field for b in bad_requests for v in b.field_violations]
    return caught.value.code(), infos[0].reason, fields


async def test_grpc_create_get_list_update_delete(grpc_patients: tuple[Any, RecordingAuditTrail]) -> None:
    stub, trail = grpc_patients
    body = to_pb(DisclosedPatient(PATIENT, phi_withheld=False))
    body.ClearField("name")
    body.ClearField("etag")

    created = await stub.CreatePatient(pb.CreatePatientRequest(parent=ORG_A, patient=body), metadata=as_("clinician"))
    assert created.name.startswith("organizations/a/patients/")
    assert (created.given_name, created.birth_date.year, created.phi_withheld) == ("Ada", 1815, False)

    seen_by_operator = await stub.GetPatient(pb.GetPatientRequest(name=created.name), metadata=as_("operator"))
    assert seen_by_operator.phi_withheld is True
    assert (seen_by_operator.given_name, seen_by_operator.national_id) == ("", "")
    assert not seen_by_operator.HasField("birth_date")
    assert list(seen_by_operator.devices) == ["devices/SN-1", "devices/SN-2"]

    listed = await stub.ListPatients(
        pb.ListPatientsRequest(parent=ORG_A, filter='devices = "devices/SN-2"'), metadata=as_("clinician")
    )
    assert [p.name for p in listed.patients] == [created.name]
    assert listed.patients[0].family_name == "Lovelace"

    update = pb.Patient(name=created.name, etag=created.etag, devices=["devices/SN-3"])
    updated = await stub.UpdatePatient(
        pb.UpdatePatientRequest(patient=update, update_mask=field_mask_pb2.FieldMask(paths=["devices"])),
        metadata=as_("operator"),
    )
    assert list(updated.devices) == ["devices/SN-3"]
    assert updated.phi_withheld is True
    assert updated.etag != created.etag

    await stub.DeletePatient(pb.DeletePatientRequest(name=created.name, etag=updated.etag), metadata=as_("clinician"))
    code, reason, _ = await call_error(
        stub.GetPatient(pb.GetPatientRequest(name=created.name), metadata=as_("clinician"))
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "PATIENT_NOT_FOUND")

    # Create (changed, read back), the operator's get (withheld: none), the clinician's list (read), the
    # operator's update (no PHI either way: an event about the change only), delete (PHI erased).
    assert [(bool(e.phi_fields_read), bool(e.phi_fields_changed)) for e in trail.events] == [
        (True, True),
        (True, False),
        (False, False),
        (False, True),
    ]
    assert all(e.method.startswith("medmesh.patient.v1.PatientService/") for e in trail.events)


async def test_grpc_permission_denied_before_not_found(grpc_patients: tuple[Any, RecordingAuditTrail]) -> None:
    stub, _ = grpc_patients

    code, reason, _ = await call_error(
        stub.GetPatient(pb.GetPatientRequest(name="organizations/a/patients/nobody"), metadata=as_("outsider"))
    )

    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ORGANIZATION_ACCESS_DENIED")


async def test_grpc_phi_write_denied(grpc_patients: tuple[Any, RecordingAuditTrail]) -> None:
    stub, _ = grpc_patients
    request = pb.UpdatePatientRequest(
        patient=pb.Patient(name="organizations/a/patients/p1", given_name="Augusta"),
        update_mask=field_mask_pb2.FieldMask(paths=["given_name"]),
    )

    code, reason, _ = await call_error(stub.UpdatePatient(request, metadata=as_("operator")))

    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PHI_WRITE_DENIED")


@pytest.mark.parametrize(
    ("patient", "field"),
    [
        (pb.Patient(contact=pb.Contact(email="not-an-address")), "patient.contact.email"),
        (pb.Patient(birth_date={"year": 2021, "month": 2, "day": 29}), "patient.birth_date"),
        (pb.Patient(devices=["SN-1"]), "patient.devices[0]"),  # the proto's own rule, by protovalidate
        (pb.Patient(national_id="x" * 65), "patient.national_id"),
    ],
)
async def test_grpc_invalid_fields_are_named(
    grpc_patients: tuple[Any, RecordingAuditTrail], patient: pb.Patient, field: str
) -> None:
    stub, trail = grpc_patients

    code, _, fields = await call_error(
        stub.CreatePatient(pb.CreatePatientRequest(parent=ORG_A, patient=patient), metadata=as_("clinician"))
    )

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == [field]
    assert trail.events == []
