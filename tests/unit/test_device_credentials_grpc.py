"""Device certificates and temporary credentials over gRPC, through the shared interceptor: the public
methods as users call them, the internal ones as the MQTT adapter does (mesh credential only), the
proto surface, the repositories' document mapping, and the wiring `__main__` uses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.api import annotations_pb2
from google.protobuf import duration_pb2
from grpc_status import rpc_status

from medmesh.device.v1 import device_credential_service_pb2 as pb
from medmesh.device.v1 import device_credential_service_pb2_grpc as pb_grpc
from medmesh.launcher.tls import ensure_device_ca
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import INTERNAL_HEADER, Authenticator, Principal, Role, TokenVerifier
from medmesh.runtime.interceptors import RequestInterceptor
from medmesh.runtime.settings import Settings
from services.device.certificates import (
    CertificateService,
    CertificateSettings,
    DeviceCertificate,
    Revocation,
    RevocationReason,
)
from services.device.credential_repository import (
    CertificateRepository,
    RevocationRepository,
    TemporaryCredentialRepository,
)
from services.device.credential_servicer import (
    INTERNAL_METHODS,
    DeviceCredentialInternalServicer,
    DeviceCredentialServicer,
    credential_bindings,
    wire_credentials,
)
from services.device.credentials import TemporaryCredential, TemporaryCredentialService
from tests.rich_status import unpack_details
from tests.unit.test_device_credentials_fakes import (
    CARE,
    CARED,
    OWNED,
    PATIENT_NAME,
    FakeCertificateStore,
    FakeCredentialStore,
    FakeDeviceRegistry,
    FakeRevocationStore,
    make_authority,
    make_csr,
    member,
)

MESH_TOKEN = "mesh-secret"


class TestAuthenticator(Authenticator):
    """Internal methods exactly as in production (mesh credential); users named by a test header."""

    __test__ = False
    principals: ClassVar[dict[str, Principal]] = {
        "operator": member(Role.OPERATOR),
        "care-clinician": member(Role.CLINICIAN, CARE),
        "patient": member(Role.PATIENT, CARE, patient=PATIENT_NAME),
        "clinician": member(Role.CLINICIAN),
    }

    def __init__(self) -> None:
        super().__init__(
            TokenVerifier(keys=None),  # type: ignore[arg-type]
            internal_methods=INTERNAL_METHODS,
            internal_token=MESH_TOKEN,
        )

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal | None:
        if method in INTERNAL_METHODS or "x-test-caller" not in metadata:
            return await super().authenticate(method, metadata)
        return self.principals[metadata["x-test-caller"]]


@dataclass
class Stack:
    public: Any
    internal: Any
    trail: RecordingAuditTrail
    registry: FakeDeviceRegistry


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    trail = RecordingAuditTrail("device")
    registry = FakeDeviceRegistry()
    settings = CertificateSettings(tmp_path / "x", tmp_path / "y")
    certificates = CertificateService(
        make_authority(tmp_path), FakeCertificateStore(), FakeRevocationStore(), registry, trail, settings
    )
    credentials = TemporaryCredentialService(registry, FakeCredentialStore(), trail)
    server = grpc.aio.server(interceptors=[RequestInterceptor("device.medmesh", TestAuthenticator())])
    pb_grpc.add_DeviceCredentialServiceServicer_to_server(  # type: ignore[no-untyped-call]
        DeviceCredentialServicer(certificates, credentials), server
    )
    pb_grpc.add_DeviceCredentialInternalServiceServicer_to_server(  # type: ignore[no-untyped-call]
        DeviceCredentialInternalServicer(certificates, credentials), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Stack(
                pb_grpc.DeviceCredentialServiceStub(channel),  # type: ignore[no-untyped-call]
                pb_grpc.DeviceCredentialInternalServiceStub(channel),  # type: ignore[no-untyped-call]
                trail,
                registry,
            )
    finally:
        await server.stop(grace=None)


def as_(caller: str) -> list[tuple[str, str]]:
    return [("x-test-caller", caller)]


MESH = [(INTERNAL_HEADER, MESH_TOKEN), ("x-medmesh-caller", "mqtt_adapter")]


async def call_error(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)
    assert status is not None
    infos, bad_requests = unpack_details(status)
    assert len(infos) == 1
    assert infos[0].domain == "device.medmesh"
    return caught.value.code(), infos[0].reason, [v.field for b in bad_requests for v in b.field_violations]


async def test_certificate_life_over_grpc(stack: Stack) -> None:
    csr, _ = make_csr(["SN-OWNED"])
    validity = duration_pb2.Duration()
    validity.FromTimedelta(timedelta(days=30))

    issued = await stack.public.IssueCertificate(
        pb.IssueCertificateRequest(device=OWNED, csr=csr, validity=validity), metadata=as_("operator")
    )
    assert issued.name == f"{OWNED}/certificates/{issued.serial_number}"
    assert (issued.state, issued.key_type, issued.subject) == (pb.Certificate.STATE_ACTIVE, "EC P-256", "CN=SN-OWNED")
    lifetime = issued.not_after_time.ToDatetime(tzinfo=UTC) - issued.create_time.ToDatetime(tzinfo=UTC)
    assert abs(lifetime - timedelta(days=30)) < timedelta(seconds=1)
    assert not issued.HasField("revoke_time")

    listed = await stack.public.ListCertificates(pb.ListCertificatesRequest(parent=OWNED), metadata=as_("operator"))
    assert [c.name for c in listed.certificates] == [issued.name]

    check = await stack.internal.CheckCertificate(pb.CheckCertificateRequest(pem=issued.pem), metadata=MESH)
    assert (check.valid, check.device, check.certificate, check.reason) == (
        True,
        OWNED,
        issued.name,
        pb.CheckCertificateResponse.REASON_UNSPECIFIED,
    )
    assert check.expire_time == issued.not_after_time
    der = x509.load_pem_x509_certificate(issued.pem.encode()).public_bytes(serialization.Encoding.DER)
    assert (await stack.internal.CheckCertificate(pb.CheckCertificateRequest(der=der), metadata=MESH)).valid

    revoked = await stack.public.RevokeCertificate(
        pb.RevokeCertificateRequest(name=issued.name, reason=pb.REVOCATION_REASON_KEY_COMPROMISE),
        metadata=as_("operator"),
    )
    assert (revoked.state, revoked.revocation_reason) == (
        pb.Certificate.STATE_REVOKED,
        pb.REVOCATION_REASON_KEY_COMPROMISE,
    )
    assert revoked.HasField("revoke_time")
    fetched = await stack.public.GetCertificate(pb.GetCertificateRequest(name=issued.name), metadata=as_("operator"))
    assert fetched == revoked

    check = await stack.internal.CheckCertificate(
        pb.CheckCertificateRequest(sha256_fingerprint=issued.sha256_fingerprint), metadata=MESH
    )
    assert (check.valid, check.reason, check.device) == (False, pb.CheckCertificateResponse.REASON_REVOKED, "")

    code, reason, _ = await call_error(
        stack.public.RevokeCertificate(pb.RevokeCertificateRequest(name=issued.name), metadata=as_("operator"))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CERTIFICATE_ALREADY_REVOKED")
    assert [e.method for e in stack.trail.events] == [
        "medmesh.device.v1.DeviceCredentialService/IssueCertificate",
        "medmesh.device.v1.DeviceCredentialService/RevokeCertificate",
    ]


async def test_generate_certificate_over_grpc(stack: Stack) -> None:
    generated = await stack.public.GenerateCertificate(
        pb.GenerateCertificateRequest(device=CARED), metadata=as_("operator")
    )

    key = serialization.load_pem_private_key(generated.private_key_pem.encode(), password=None)
    certificate = x509.load_pem_x509_certificate(generated.certificate.pem.encode())
    assert certificate.public_key() == key.public_key()
    check = await stack.internal.CheckCertificate(
        pb.CheckCertificateRequest(pem=generated.certificate.pem), metadata=MESH
    )
    assert check.device == CARED


async def test_temporary_credentials_over_grpc(stack: Stack) -> None:
    ttl = duration_pb2.Duration(seconds=600)

    issued = await stack.public.CreateTemporaryCredentials(
        pb.CreateTemporaryCredentialsRequest(device=CARED, ttl=ttl), metadata=as_("patient")
    )
    verified = await stack.internal.VerifyTemporaryCredentials(
        pb.VerifyTemporaryCredentialsRequest(username=issued.username, password=issued.password), metadata=MESH
    )
    wrong = await stack.internal.VerifyTemporaryCredentials(
        pb.VerifyTemporaryCredentialsRequest(username=issued.username, password="guess"), metadata=MESH
    )

    assert issued.device == CARED
    lifetime = issued.expire_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(minutes=9) < lifetime <= timedelta(minutes=10)
    assert (verified.valid, verified.device, verified.expire_time) == (True, CARED, issued.expire_time)
    assert (wrong.valid, wrong.device, wrong.reason) == (
        False,
        "",
        pb.VerifyTemporaryCredentialsResponse.REASON_UNKNOWN,
    )
    [event] = stack.trail.events
    assert (event.organization, event.resource, event.actor.subject) == (CARE, CARED, f"{CARE}/users/patient")
    assert issued.password not in repr(event)


async def test_without_a_ttl_credentials_last_fifteen_minutes(stack: Stack) -> None:
    issued = await stack.public.CreateTemporaryCredentials(
        pb.CreateTemporaryCredentialsRequest(device=OWNED), metadata=as_("clinician")
    )

    lifetime = issued.expire_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(minutes=14) < lifetime <= timedelta(minutes=15)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.internal.CheckCertificate(pb.CheckCertificateRequest(pem="x"), metadata=as_("operator")),
        lambda s: s.internal.VerifyTemporaryCredentials(
            pb.VerifyTemporaryCredentialsRequest(username="tc-x", password="y"),
            metadata=[(INTERNAL_HEADER, "wrong"), *as_("operator")],
        ),
        lambda s: s.internal.CheckCertificate(pb.CheckCertificateRequest(pem="x")),
    ],
    ids=["user token", "wrong mesh credential", "nothing"],
)
async def test_internal_methods_need_the_mesh_credential(stack: Stack, call: Any) -> None:
    code, reason, _ = await call_error(call(stack))

    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INTERNAL_ONLY")


async def test_users_get_permission_denied_before_not_found(stack: Stack) -> None:
    code, reason, _ = await call_error(
        stack.public.GetCertificate(
            pb.GetCertificateRequest(name="devices/SN-NOPE/certificates/abc"), metadata=as_("operator")
        )
    )

    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ORGANIZATION_ACCESS_DENIED")


OPERATOR = as_("operator")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.IssueCertificate(pb.IssueCertificateRequest(device="SN-1", csr="x"), metadata=OPERATOR), "device"),
        (lambda s: s.IssueCertificate(pb.IssueCertificateRequest(device=OWNED), metadata=OPERATOR), "csr"),
        (
            lambda s: s.IssueCertificate(
                pb.IssueCertificateRequest(device=OWNED, csr="x", validity=duration_pb2.Duration(seconds=60)),
                metadata=OPERATOR,
            ),
            "validity",
        ),
        (
            lambda s: s.GetCertificate(pb.GetCertificateRequest(name=f"{OWNED}/certificates/ABC"), metadata=OPERATOR),
            "name",
        ),
        (
            lambda s: s.CreateTemporaryCredentials(
                pb.CreateTemporaryCredentialsRequest(device=OWNED, ttl=duration_pb2.Duration(seconds=86401)),
                metadata=OPERATOR,
            ),
            "ttl",
        ),
        (
            lambda s: s.IssueCertificate(pb.IssueCertificateRequest(device=OWNED, csr="not a csr"), metadata=OPERATOR),
            "csr",
        ),
    ],
    ids=["device name", "csr missing", "validity", "certificate name", "ttl", "csr garbage"],
)
async def test_invalid_requests_name_the_field(stack: Stack, call: Any, field: str) -> None:
    code, _, fields = await call_error(call(stack.public))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == [field]
    assert stack.trail.events == []


async def test_check_certificate_needs_one_of_its_inputs(stack: Stack) -> None:
    code, _, _ = await call_error(stack.internal.CheckCertificate(pb.CheckCertificateRequest(), metadata=MESH))

    assert code == grpc.StatusCode.INVALID_ARGUMENT


# --- the proto surface ------------------------------------------------------------------------------


def test_every_internal_method_needs_the_mesh_credential_and_no_public_one_does() -> None:
    internal = pb.DESCRIPTOR.services_by_name["DeviceCredentialInternalService"]
    public = pb.DESCRIPTOR.services_by_name["DeviceCredentialService"]

    assert {f"/{internal.full_name}/{m.name}" for m in internal.methods} == INTERNAL_METHODS
    for method in public.methods:
        assert method.GetOptions().HasExtension(annotations_pb2.http), method.name
    for method in internal.methods:
        assert not method.GetOptions().HasExtension(annotations_pb2.http), method.name


# --- repositories: the document mapping -------------------------------------------------------------

AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)


def test_certificate_documents_round_trip_without_the_revocation() -> None:
    repository = CertificateRepository(
        cast(Any, {"device_certificates": None, "device_certificate_fingerprints": None})
    )
    revocation = Revocation("abc", "SN-1", AT, RevocationReason.SUPERSEDED, "someone")
    certificate = DeviceCertificate(
        "abc", "SN-1", "uid-1", "PEM", "f" * 64, "CN=SN-1", "EC P-256", AT, AT + timedelta(days=1), AT, "someone"
    )

    document = repository.to_document(certificate)

    assert document["_id"] == "abc"
    assert document["device_id"] == "SN-1"
    assert "revocation" not in document
    assert repository.from_document(document) == certificate
    assert repository.from_document(repository.to_document(replace(certificate, revocation=revocation))) == certificate


def test_revocation_documents_round_trip() -> None:
    repository = RevocationRepository(cast(Any, {"device_certificate_revocations": None}))
    revocation = Revocation("abc", "SN-1", AT, RevocationReason.KEY_COMPROMISE, "someone")

    document = repository.to_document(revocation)

    assert document["reason"] == "KEY_COMPROMISE"
    assert repository.from_document(document) == revocation


def test_temporary_credential_documents_hold_no_password() -> None:
    repository = TemporaryCredentialRepository(cast(Any, {"device_temporary_credentials": None}))
    credential = TemporaryCredential(
        "tc-" + "0" * 32, "SN-1", "uid-1", "a" * 64, AT + timedelta(minutes=15), AT, "someone"
    )

    document = repository.to_document(credential)

    assert set(document) == {
        "_id",
        "device_id",
        "device_registration",
        "password_sha256",
        "expire_time",
        "create_time",
        "created_by",
        "revision",
    }
    assert repository.from_document(document) == credential


# --- wiring -----------------------------------------------------------------------------------------


def test_wiring_for_the_device_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert_file, key_file = ensure_device_ca(tmp_path)
    monkeypatch.setenv("MEDMESH_DEVICE_CA_CERT_FILE", str(cert_file))
    monkeypatch.setenv("MEDMESH_DEVICE_CA_KEY_FILE", str(key_file))
    database = cast(Any, {name: None for name in _COLLECTIONS})

    wiring = wire_credentials(database, Settings.from_env("device"), FakeDeviceRegistry(), RecordingAuditTrail())
    bindings = credential_bindings(database, Settings.from_env("device"), FakeDeviceRegistry(), RecordingAuditTrail())

    names = ["medmesh.device.v1.DeviceCredentialService", "medmesh.device.v1.DeviceCredentialInternalService"]
    assert [b.full_name for b in wiring.bindings] == names
    assert [b.full_name for b in bindings] == names
    assert wiring.internal_methods == INTERNAL_METHODS
    assert [type(r) for r in wiring.repositories] == [
        CertificateRepository,
        RevocationRepository,
        TemporaryCredentialRepository,
    ]


def test_wiring_refuses_to_start_without_a_device_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDMESH_DEVICE_CA_CERT_FILE", raising=False)
    monkeypatch.delenv("MEDMESH_DEVICE_CA_KEY_FILE", raising=False)
    database = cast(Any, {name: None for name in _COLLECTIONS})

    with pytest.raises(ValueError, match="MEDMESH_DEVICE_CA_CERT_FILE"):
        wire_credentials(database, Settings.from_env("device"), FakeDeviceRegistry(), RecordingAuditTrail())


_COLLECTIONS = (
    "device_certificates",
    "device_certificate_fingerprints",
    "device_certificate_revocations",
    "device_temporary_credentials",
)
