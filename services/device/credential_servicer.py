"""gRPC servicers of device certificates and temporary credentials (protobuf <-> domain, nothing else),
and their wiring into the device service's process (`wire_credentials`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import grpc
from google.protobuf import duration_pb2
from pymongo.asynchronous.database import AsyncDatabase

from medmesh.device.v1 import device_credential_service_pb2 as pb
from medmesh.device.v1 import device_credential_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit import AuditTrail
from medmesh.runtime.mongo import Document
from medmesh.runtime.protoconv import timestamp
from medmesh.runtime.server import ServiceBinding
from medmesh.runtime.settings import Settings
from services.device.certificates import (
    CertificateAuthority,
    CertificateCheck,
    CertificateService,
    CertificateSettings,
    CertificateState,
    CheckFailure,
    DeviceCertificate,
    DeviceRegistry,
    RevocationReason,
)
from services.device.credential_repository import (
    CertificateRepository,
    RevocationRepository,
    TemporaryCredentialRepository,
)
from services.device.credentials import CredentialCheck, TemporaryCredentialService, VerifyFailure

PUBLIC_SERVICE = "medmesh.device.v1.DeviceCredentialService"
INTERNAL_SERVICE = "medmesh.device.v1.DeviceCredentialInternalService"
# For `service_authenticator(identity, internal_methods=...)`: only the mesh credential reaches these.
INTERNAL_METHODS = frozenset(
    {
        f"/{INTERNAL_SERVICE}/CheckCertificate",
        f"/{INTERNAL_SERVICE}/VerifyTemporaryCredentials",
    }
)

_STATE_TO_PB = {
    CertificateState.ACTIVE: pb.Certificate.STATE_ACTIVE,
    CertificateState.REVOKED: pb.Certificate.STATE_REVOKED,
}
_REASON_TO_PB = {
    RevocationReason.UNSPECIFIED: pb.REVOCATION_REASON_UNSPECIFIED,
    RevocationReason.KEY_COMPROMISE: pb.REVOCATION_REASON_KEY_COMPROMISE,
    RevocationReason.AFFILIATION_CHANGED: pb.REVOCATION_REASON_AFFILIATION_CHANGED,
    RevocationReason.SUPERSEDED: pb.REVOCATION_REASON_SUPERSEDED,
    RevocationReason.CESSATION_OF_OPERATION: pb.REVOCATION_REASON_CESSATION_OF_OPERATION,
}
_REASON_FROM_PB = {value: key for key, value in _REASON_TO_PB.items()}
_CHECK_TO_PB = {
    CheckFailure.UNKNOWN: pb.CheckCertificateResponse.REASON_UNKNOWN,
    CheckFailure.REVOKED: pb.CheckCertificateResponse.REASON_REVOKED,
    CheckFailure.EXPIRED: pb.CheckCertificateResponse.REASON_EXPIRED,
    CheckFailure.NOT_YET_VALID: pb.CheckCertificateResponse.REASON_NOT_YET_VALID,
    CheckFailure.WRONG_ISSUER: pb.CheckCertificateResponse.REASON_WRONG_ISSUER,
    CheckFailure.DEVICE_NOT_FOUND: pb.CheckCertificateResponse.REASON_DEVICE_NOT_FOUND,
}
_VERIFY_TO_PB = {
    VerifyFailure.UNKNOWN: pb.VerifyTemporaryCredentialsResponse.REASON_UNKNOWN,
    VerifyFailure.EXPIRED: pb.VerifyTemporaryCredentialsResponse.REASON_EXPIRED,
    VerifyFailure.DEVICE_NOT_FOUND: pb.VerifyTemporaryCredentialsResponse.REASON_DEVICE_NOT_FOUND,
}


def certificate_to_pb(certificate: DeviceCertificate) -> pb.Certificate:
    message = pb.Certificate(
        name=certificate.name,
        serial_number=certificate.id,
        pem=certificate.pem,
        sha256_fingerprint=certificate.sha256_fingerprint,
        subject=certificate.subject,
        key_type=certificate.key_type,
        not_before_time=timestamp(certificate.not_before),
        not_after_time=timestamp(certificate.not_after),
        state=_STATE_TO_PB[certificate.state],
        create_time=timestamp(certificate.create_time),
    )
    if certificate.revocation is not None:
        message.revoke_time.CopyFrom(timestamp(certificate.revocation.revoke_time))
        message.revocation_reason = _REASON_TO_PB[certificate.revocation.reason]
    return message


def check_to_pb(check: CertificateCheck) -> pb.CheckCertificateResponse:
    if check.certificate is None or check.failure is not None:
        failure = check.failure or CheckFailure.UNKNOWN
        return pb.CheckCertificateResponse(valid=False, reason=_CHECK_TO_PB[failure])
    return pb.CheckCertificateResponse(
        valid=True,
        device=check.certificate.device,
        certificate=check.certificate.name,
        expire_time=timestamp(check.certificate.not_after),
    )


def verification_to_pb(check: CredentialCheck) -> pb.VerifyTemporaryCredentialsResponse:
    if check.failure is not None or check.expire_time is None:
        failure = check.failure or VerifyFailure.UNKNOWN
        return pb.VerifyTemporaryCredentialsResponse(valid=False, reason=_VERIFY_TO_PB[failure])
    return pb.VerifyTemporaryCredentialsResponse(
        valid=True, device=check.device, expire_time=timestamp(check.expire_time)
    )


def _duration(message: duration_pb2.Duration, present: bool) -> timedelta | None:
    return message.ToTimedelta() if present else None


class DeviceCredentialServicer(pb_grpc.DeviceCredentialServiceServicer):
    def __init__(self, certificates: CertificateService, credentials: TemporaryCredentialService) -> None:
        self._certificates = certificates
        self._credentials = credentials

    async def IssueCertificate(
        self, request: pb.IssueCertificateRequest, context: grpc.aio.ServicerContext
    ) -> pb.Certificate:
        validity = _duration(request.validity, request.HasField("validity"))
        return certificate_to_pb(await self._certificates.issue(request.device, request.csr, validity))

    async def GenerateCertificate(
        self, request: pb.GenerateCertificateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateCertificateResponse:
        validity = _duration(request.validity, request.HasField("validity"))
        generated = await self._certificates.generate(request.device, validity)
        return pb.GenerateCertificateResponse(
            certificate=certificate_to_pb(generated.certificate), private_key_pem=generated.private_key_pem
        )

    async def GetCertificate(
        self, request: pb.GetCertificateRequest, context: grpc.aio.ServicerContext
    ) -> pb.Certificate:
        return certificate_to_pb(await self._certificates.get(request.name))

    async def ListCertificates(
        self, request: pb.ListCertificatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCertificatesResponse:
        page = await self._certificates.list_certificates(
            request.parent, request.filter, request.page_size, request.page_token
        )
        return pb.ListCertificatesResponse(
            certificates=[certificate_to_pb(c) for c in page.certificates], next_page_token=page.next_page_token
        )

    async def RevokeCertificate(
        self, request: pb.RevokeCertificateRequest, context: grpc.aio.ServicerContext
    ) -> pb.Certificate:
        reason = _REASON_FROM_PB.get(request.reason, RevocationReason.UNSPECIFIED)
        return certificate_to_pb(await self._certificates.revoke(request.name, reason))

    async def CreateTemporaryCredentials(
        self, request: pb.CreateTemporaryCredentialsRequest, context: grpc.aio.ServicerContext
    ) -> pb.TemporaryCredentials:
        issued = await self._credentials.create(request.device, _duration(request.ttl, request.HasField("ttl")))
        return pb.TemporaryCredentials(
            device=issued.device,
            username=issued.username,
            password=issued.password,
            expire_time=timestamp(issued.expire_time),
        )


class DeviceCredentialInternalServicer(pb_grpc.DeviceCredentialInternalServiceServicer):
    def __init__(self, certificates: CertificateService, credentials: TemporaryCredentialService) -> None:
        self._certificates = certificates
        self._credentials = credentials

    async def CheckCertificate(
        self, request: pb.CheckCertificateRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckCertificateResponse:
        which = request.WhichOneof("certificate")
        check = await self._certificates.check(
            pem=request.pem if which == "pem" else "",
            der=request.der if which == "der" else b"",
            fingerprint=request.sha256_fingerprint if which == "sha256_fingerprint" else "",
        )
        return check_to_pb(check)

    async def VerifyTemporaryCredentials(
        self, request: pb.VerifyTemporaryCredentialsRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyTemporaryCredentialsResponse:
        return verification_to_pb(await self._credentials.verify(request.username, request.password))


@dataclass(frozen=True)
class CredentialWiring:
    """Everything `services/device/__main__.py` needs from this part of the service."""

    bindings: list[ServiceBinding]
    # Pass to `readiness(database, ..., *repositories)`: their indexes are made on the first check.
    repositories: tuple[CertificateRepository, RevocationRepository, TemporaryCredentialRepository]
    # Pass to `service_authenticator(identity, internal_methods=...)`.
    internal_methods: frozenset[str]
    certificates: CertificateService
    # `asyncio.create_task(wiring.temporary_credentials.run_sweeper())` in on_start; cancel it in on_stop.
    temporary_credentials: TemporaryCredentialService


def wire_credentials(
    database: AsyncDatabase[Document],
    settings: Settings,
    registry: DeviceRegistry,
    trail: AuditTrail,
    certificate_settings: CertificateSettings | None = None,
) -> CredentialWiring:
    """Loads the device CA (`MEDMESH_DEVICE_CA_CERT_FILE` / `_KEY_FILE`; a missing or unusable CA
    stops the service at start-up rather than at the first device) and builds both gRPC services
    on the device service's own database."""
    del settings  # same database, same audit trail: nothing of its own to configure yet
    certificate_settings = certificate_settings or CertificateSettings.from_env()
    authority = CertificateAuthority.load(certificate_settings.ca_cert_file, certificate_settings.ca_key_file)
    certificate_store = CertificateRepository(database)
    revocations = RevocationRepository(database)
    credential_store = TemporaryCredentialRepository(database)
    certificates = CertificateService(authority, certificate_store, revocations, registry, trail, certificate_settings)
    credentials = TemporaryCredentialService(registry, credential_store, trail)
    bindings = [
        ServiceBinding(
            PUBLIC_SERVICE,
            DeviceCredentialServicer(certificates, credentials),
            pb_grpc.add_DeviceCredentialServiceServicer_to_server,
        ),
        ServiceBinding(
            INTERNAL_SERVICE,
            DeviceCredentialInternalServicer(certificates, credentials),
            pb_grpc.add_DeviceCredentialInternalServiceServicer_to_server,
        ),
    ]
    return CredentialWiring(
        bindings, (certificate_store, revocations, credential_store), INTERNAL_METHODS, certificates, credentials
    )


def credential_bindings(
    database: AsyncDatabase[Document], settings: Settings, registry: DeviceRegistry, trail: AuditTrail
) -> list[ServiceBinding]:
    """Just the bindings; prefer `wire_credentials`, which also gives the repositories whose indexes
    readiness should make and the sweeper of expired temporary credentials."""
    return wire_credentials(database, settings, registry, trail).bindings
