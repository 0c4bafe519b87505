"""gRPC servicer: translates protobuf <-> domain, nothing else."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from medmesh.patient.v1 import patient_service_pb2 as pb
from medmesh.patient.v1 import patient_service_pb2_grpc as pb_grpc
from medmesh.runtime.protoconv import timestamp
from services.patient.domain import Contact, PatientDetails, Sex
from services.patient.service import DisclosedPatient, PatientService

_SEX_TO_PB = {
    Sex.FEMALE: pb.Patient.SEX_FEMALE,
    Sex.MALE: pb.Patient.SEX_MALE,
    Sex.OTHER: pb.Patient.SEX_OTHER,
    Sex.UNKNOWN: pb.Patient.SEX_UNKNOWN,
}
_SEX_FROM_PB = {value: key for key, value in _SEX_TO_PB.items()}


def to_pb(shown: DisclosedPatient) -> pb.Patient:
    patient = shown.patient
    message = pb.Patient(
        name=patient.name,
        given_name=patient.given_name,
        family_name=patient.family_name,
        sex=_SEX_TO_PB[patient.sex] if patient.sex else pb.Patient.SEX_UNSPECIFIED,
        national_id=patient.national_id,
        devices=patient.devices,
        phi_withheld=shown.phi_withheld,
        create_time=timestamp(patient.create_time),
        update_time=timestamp(patient.update_time),
        etag=patient.etag,
    )
    if patient.birth_date is not None:
        # Set field by field: google.type ships without type information.
        message.birth_date.year = patient.birth_date.year
        message.birth_date.month = patient.birth_date.month
        message.birth_date.day = patient.birth_date.day
    if not patient.contact.is_empty:
        contact = patient.contact
        message.contact.CopyFrom(pb.Contact(email=contact.email, phone=contact.phone, address=contact.address))
    return message


def details_from_pb(patient: pb.Patient) -> PatientDetails:
    return PatientDetails(
        given_name=patient.given_name,
        family_name=patient.family_name,
        birth_date=(patient.birth_date.year, patient.birth_date.month, patient.birth_date.day),
        sex=_SEX_FROM_PB.get(patient.sex),
        contact=Contact(patient.contact.email, patient.contact.phone, patient.contact.address),
        national_id=patient.national_id,
        devices=tuple(patient.devices),
    )


class PatientServicer(pb_grpc.PatientServiceServicer):
    def __init__(self, service: PatientService) -> None:
        self._service = service

    async def CreatePatient(self, request: pb.CreatePatientRequest, context: grpc.aio.ServicerContext) -> pb.Patient:
        return to_pb(await self._service.create(request.parent, details_from_pb(request.patient)))

    async def GetPatient(self, request: pb.GetPatientRequest, context: grpc.aio.ServicerContext) -> pb.Patient:
        return to_pb(await self._service.get(request.name))

    async def ListPatients(
        self, request: pb.ListPatientsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPatientsResponse:
        page = await self._service.list_patients(request.parent, request.filter, request.page_size, request.page_token)
        return pb.ListPatientsResponse(patients=[to_pb(p) for p in page.patients], next_page_token=page.next_page_token)

    async def UpdatePatient(self, request: pb.UpdatePatientRequest, context: grpc.aio.ServicerContext) -> pb.Patient:
        shown = await self._service.update(
            request.patient.name,
            details_from_pb(request.patient),
            list(request.update_mask.paths),
            request.patient.etag,
        )
        return to_pb(shown)

    async def DeletePatient(
        self, request: pb.DeletePatientRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._service.delete(request.name, request.etag)
        return empty_pb2.Empty()
