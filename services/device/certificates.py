"""Device certificates: the platform's device CA, certificates issued from CSRs, revocation, and
the check the MQTT adapter makes when a device connects.

A device proves who it is with a client certificate this service issued: subject `CN={device id}`,
the URI `urn:medmesh:device:{id}` as subject alternative name, clientAuth only. The device makes
its key pair and sends a CSR; the CSR's subject common name must already be the device id, so a
CSR uploaded for the wrong device (a mix-up on the production line) is refused instead of binding
one device's key to another's identity. Everything else a CSR asks for is ignored.

Certificates are immutable once issued. Revoking one inserts a revocation keyed by the serial
number: a unique insert is atomic on every MongoDB the platform runs on (FerretDB's conditional
updates are not), so of two concurrent revocations exactly one wins and is audited.

Certificates belong to the device's owner organization (audit events go there); the admins and
operators of the owner and of the care organization the device is assigned to manage them, and
platform admins every device's.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import Principal, Role, current_principal
from medmesh.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from medmesh.runtime.filtering import Condition, Converter, rfc3339_timestamp
from medmesh.runtime.resources import ResourceStore, list_page, now
from services.device.domain import NAME_PREFIX
from services.device.domain import parse_name as parse_device_name

CERTIFICATES = "/certificates/"
SERIAL_PATTERN = re.compile(r"^[0-9a-f]{1,40}$")
FINGERPRINT_PATTERN = re.compile(r"^[0-9a-f]{64}$")
DEVICE_URI_PREFIX = "urn:medmesh:device:"

DEFAULT_VALIDITY = timedelta(days=365)
MIN_VALIDITY = timedelta(hours=1)
MAX_VALIDITY = timedelta(days=3650)
# Backdated so a device whose clock is slightly behind accepts (and presents) a fresh certificate.
CLOCK_SKEW = timedelta(minutes=5)
MIN_RSA_BITS = 2048
# Larger RSA keys add nothing here but make every handshake slower for the broker.
MAX_RSA_BITS = 8192
_CURVES = {"secp256r1": "EC P-256", "secp384r1": "EC P-384"}

# Who manages a device's certificates: of the device's owner or care organization; platform admins everywhere.
CERTIFICATE_ROLES = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.OPERATOR)
# A serial collision needs two equal 159-bit random numbers; retrying is cheaper than explaining.
_ISSUE_ATTEMPTS = 3

Clock = Callable[[], datetime]


# --- the device registry, as this part of the device service sees it ----------------------------


@dataclass(frozen=True)
class DeviceAssignment:
    """Who owns a device's data now (`medmesh.device.v1.DeviceAssignment`)."""

    device: str  # devices/{id}
    organization: str  # the owner, organizations/{o}
    care_organization: str = ""  # organizations/{o}, or "" when not assigned to a care organization
    patient: str = ""  # organizations/{o}/patients/{p}, or "" when not assigned
    # Tells registrations of the same serial apart (the registry's device uid): what was issued to
    # a registration since deleted does not count for a later one. "" when the registry has none.
    registration: str = ""

    @property
    def data_organization(self) -> str:
        """Owner of what the device produces or receives: the care organization if any, else the owner."""
        return self.care_organization or self.organization


class DeviceRegistry(Protocol):
    async def get_assignment(self, device: str) -> DeviceAssignment | None:
        """The assignment of `devices/{id}`, or None when no such device is registered."""


def may_access_device(principal: Principal, assignment: DeviceAssignment) -> bool:
    """Members of the owner or the care organization, platform admins, internal callers; a patient
    only for the device assigned to them."""
    if principal.role is Role.PATIENT:
        return bool(assignment.patient) and principal.patient == assignment.patient
    if principal.can_access(assignment.organization):
        return True
    return bool(assignment.care_organization) and principal.can_access(assignment.care_organization)


def _denied(principal: Principal, resource: str) -> PermissionDenied:
    return PermissionDenied(
        f"{principal.subject} may not access {resource}",
        reason="ORGANIZATION_ACCESS_DENIED",
        metadata={"resource": resource},
    )


async def authorize_device(
    registry: DeviceRegistry,
    principal: Principal,
    name: str,
    *,
    roles: tuple[Role, ...],
    action: str,
    field: str = "device",
    resource: str = "",
) -> DeviceAssignment:
    """The role first, then the device: device names carry no organization, so a caller who does
    not see every organization gets PERMISSION_DENIED for a device that does not exist and for one
    of another organization alike; platform admins get NOT_FOUND."""
    principal.require_role(*roles, action=action)
    device = NAME_PREFIX + parse_device_name(name, field)
    assignment = await registry.get_assignment(device)
    if assignment is None:
        if not principal.sees_every_organization:
            raise _denied(principal, resource or device)
        raise NotFound(f"device {device!r} does not exist", reason="DEVICE_NOT_FOUND", metadata={"device": device})
    if not may_access_device(principal, assignment):
        raise _denied(principal, resource or device)
    return assignment


# --- the CA ---------------------------------------------------------------------------------------

IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class CertificateSettings:
    """From the environment: where the device CA is, the default validity, whether the server may
    make key pairs (development only; a production deployment switches it off)."""

    ca_cert_file: Path
    ca_key_file: Path
    default_validity: timedelta = DEFAULT_VALIDITY
    allow_generate: bool = True

    @classmethod
    def from_env(cls) -> CertificateSettings:
        cert_file = os.environ.get("MEDMESH_DEVICE_CA_CERT_FILE", "").strip()
        key_file = os.environ.get("MEDMESH_DEVICE_CA_KEY_FILE", "").strip()
        if not cert_file or not key_file:
            raise ValueError(
                "MEDMESH_DEVICE_CA_CERT_FILE and MEDMESH_DEVICE_CA_KEY_FILE must name the device CA's PEM files"
            )
        written = os.environ.get("MEDMESH_DEVICE_CERTIFICATE_VALIDITY_DAYS", "").strip() or "365"
        try:
            days = float(written)
        except ValueError:
            days = -1.0
        if not MIN_VALIDITY <= timedelta(days=days) <= MAX_VALIDITY:
            raise ValueError(
                f"MEDMESH_DEVICE_CERTIFICATE_VALIDITY_DAYS must be a number from 1/24 to 3650, got {written!r}"
            )
        generate = os.environ.get("MEDMESH_DEVICE_CERTIFICATE_GENERATE", "").strip().lower() or "true"
        return cls(
            ca_cert_file=Path(cert_file),
            ca_key_file=Path(key_file),
            default_validity=timedelta(days=days),
            allow_generate=generate in {"1", "true", "yes", "on"},
        )


class CertificateAuthority:
    """The platform's device CA: signs device certificates and recognizes the ones it signed."""

    def __init__(self, certificate: x509.Certificate, key: IssuerKey) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError("the device CA key must be an EC or RSA key")
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if certificate.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise ValueError("the device CA key does not belong to the device CA certificate")
        try:
            is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ValueError("the device CA certificate is not a CA (basicConstraints CA:TRUE)")
        self.certificate = certificate
        self._key = key
        try:
            self._key_identifier = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            )
        except x509.ExtensionNotFound:
            self._key_identifier = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> CertificateAuthority:
        """Reads the PEM files (the key unencrypted: a Kubernetes Secret or the launcher's state dir)."""
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"{key_file}: the device CA key must be an EC or RSA key")
        return cls(certificate, key)

    def issue(
        self,
        device_id: str,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        at: datetime,
        validity: timedelta,
    ) -> x509.Certificate:
        # A certificate must not outlive its issuer, or verifiers reject it near the end of the CA's life.
        not_after = min(at + validity, self.certificate.not_valid_after_utc)
        if not_after <= at:
            raise FailedPrecondition(
                "the device CA has expired; no certificate can be issued", reason="DEVICE_CA_EXPIRED"
            )
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(at - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._key_identifier, critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def issued(self, certificate: x509.Certificate) -> bool:
        """Signed by this CA (issuer name and signature both checked)."""
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return False
        return True


# --- certificates ---------------------------------------------------------------------------------


class CertificateState(StrEnum):
    ACTIVE = "ACTIVE"
    REVOKED = "REVOKED"


class RevocationReason(StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    KEY_COMPROMISE = "KEY_COMPROMISE"
    AFFILIATION_CHANGED = "AFFILIATION_CHANGED"
    SUPERSEDED = "SUPERSEDED"
    CESSATION_OF_OPERATION = "CESSATION_OF_OPERATION"


@dataclass(frozen=True)
class Revocation:
    """Kept in its own collection, keyed by serial: its unique insert is what makes revocation atomic."""

    id: str  # the certificate's serial number, lower-case hex
    device_id: str
    revoke_time: datetime
    reason: RevocationReason
    revoked_by: str  # the subject who revoked it
    revision: int = 1


@dataclass(frozen=True)
class DeviceCertificate:
    id: str  # serial number, lower-case hex without leading zeros
    device_id: str
    device_registration: str  # `DeviceAssignment.registration` at issue
    pem: str
    sha256_fingerprint: str
    subject: str
    key_type: str
    not_before: datetime
    not_after: datetime
    create_time: datetime
    issued_by: str  # the subject who had it issued
    # Not stored with the certificate: the service fills it in from the revocations.
    revocation: Revocation | None = None
    revision: int = 1

    @property
    def device(self) -> str:
        return NAME_PREFIX + self.device_id

    @property
    def name(self) -> str:
        return self.device + CERTIFICATES + self.id

    @property
    def state(self) -> CertificateState:
        return CertificateState.REVOKED if self.revocation else CertificateState.ACTIVE


def _expiry(certificate: DeviceCertificate) -> str:
    return f"expires {certificate.not_after:%Y-%m-%dT%H:%M:%SZ}"


def serial_id(serial_number: int) -> str:
    return format(serial_number, "x")


def fingerprint_of(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def certificate_record(
    certificate: x509.Certificate, assignment: DeviceAssignment, key_type: str, at: datetime, by: str
) -> DeviceCertificate:
    return DeviceCertificate(
        id=serial_id(certificate.serial_number),
        device_id=parse_device_name(assignment.device),
        device_registration=assignment.registration,
        pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        sha256_fingerprint=fingerprint_of(certificate),
        subject=certificate.subject.rfc4514_string(),
        key_type=key_type,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        create_time=at,
        issued_by=by,
    )


def parse_certificate_name(name: str, field: str = "name") -> tuple[str, str]:
    """`devices/{d}/certificates/{serial}` -> (`devices/{d}`, serial)."""
    device, separator, serial = name.rpartition(CERTIFICATES)
    if separator and SERIAL_PATTERN.match(serial):
        try:
            return NAME_PREFIX + parse_device_name(device, field), serial
        except InvalidArgument:
            pass
    raise InvalidArgument.for_field(
        field, f"must look like devices/{{device}}/certificates/{{certificate}}, got {name!r}", reason="INVALID_NAME"
    )


def require_validity(
    validity: timedelta | None, field: str = "validity", default: timedelta = DEFAULT_VALIDITY
) -> timedelta:
    if validity is None:
        return default
    if not MIN_VALIDITY <= validity <= MAX_VALIDITY:
        raise InvalidArgument.for_field(field, "must be between one hour and 3650 days", reason="INVALID_VALIDITY")
    return validity


def describe_key(public_key: object, field: str = "csr") -> str:
    """`EC P-256`, `EC P-384` or `RSA <bits>`; any other key is INVALID_ARGUMENT."""
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name in _CURVES:
        return _CURVES[public_key.curve.name]
    if isinstance(public_key, rsa.RSAPublicKey) and MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS:
        return f"RSA {public_key.key_size}"
    raise InvalidArgument.for_field(
        field,
        f"the key must be EC P-256, EC P-384 or RSA of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits",
        reason="UNSUPPORTED_KEY",
    )


@dataclass(frozen=True)
class CertificateRequest:
    """A CSR that passed every check: its key and what kind of key it is."""

    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    key_type: str


def parse_csr(pem: str, device_id: str, field: str = "csr") -> CertificateRequest:
    """Checks a PEM CSR: well-formed, signed by its own key, subject CN = the device id, key allowed."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
        signature_valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise InvalidArgument.for_field(
            field, f"is not a usable PEM PKCS #10 certificate signing request: {error}", reason="INVALID_CSR"
        ) from error
    if not signature_valid:
        raise InvalidArgument.for_field(
            field, "its signature does not verify with its own key", reason="CSR_SIGNATURE_INVALID"
        )
    common_names = [str(attribute.value) for attribute in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if common_names != [device_id]:
        raise InvalidArgument.for_field(
            field,
            f"the subject common name must be the device id {device_id!r}, got {', '.join(common_names) or 'none'}",
            reason="CSR_SUBJECT_MISMATCH",
        )
    key_type = describe_key(public_key, field)
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)  # describe_key allows nothing else
    return CertificateRequest(public_key, key_type)


def parse_presented(pem: str = "", der: bytes = b"") -> x509.Certificate:
    """The certificate a client presented, PEM or DER."""
    try:
        if pem:
            return x509.load_pem_x509_certificate(pem.encode())
        return x509.load_der_x509_certificate(der)
    except ValueError as error:
        field = "pem" if pem else "der"
        raise InvalidArgument.for_field(
            field, f"is not an X.509 certificate: {error}", reason="INVALID_CERTIFICATE"
        ) from error


def _device_named_in(certificate: x509.Certificate) -> str:
    """`devices/{common name}`, or "" when the subject has no usable one."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return ""
    try:
        return NAME_PREFIX + parse_device_name(NAME_PREFIX + str(names[0].value))
    except InvalidArgument:
        return ""


async def _nothing() -> None:
    return None


def normalize_fingerprint(written: str, field: str = "sha256_fingerprint") -> str:
    fingerprint = written.replace(":", "").lower()
    if not FINGERPRINT_PATTERN.match(fingerprint):
        raise InvalidArgument.for_field(
            field, "must be 64 hexadecimal digits (colons allowed)", reason="INVALID_FINGERPRINT"
        )
    return fingerprint


def _fingerprint_filter(written: str) -> str:
    fingerprint = written.replace(":", "").lower()
    if not FINGERPRINT_PATTERN.match(fingerprint):
        raise ValueError("must be 64 hexadecimal digits")
    return fingerprint


# Filter names are the protobuf names; keys are the stored attributes (the same in documents).
FILTER_FIELDS: dict[str, tuple[str, Converter]] = {
    "not_after_time": ("not_after", rfc3339_timestamp),
    "not_before_time": ("not_before", rfc3339_timestamp),
    "create_time": ("create_time", rfc3339_timestamp),
    "sha256_fingerprint": ("sha256_fingerprint", _fingerprint_filter),
}


class CheckFailure(StrEnum):
    UNKNOWN = "UNKNOWN"
    REVOKED = "REVOKED"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"
    WRONG_ISSUER = "WRONG_ISSUER"
    DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"


@dataclass(frozen=True)
class CertificateCheck:
    """The adapter's answer: `certificate` is set only when valid."""

    certificate: DeviceCertificate | None
    failure: CheckFailure | None = None

    @property
    def valid(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class CertificatePage:
    certificates: list[DeviceCertificate]
    next_page_token: str


@dataclass(frozen=True)
class GeneratedCertificate:
    certificate: DeviceCertificate
    private_key_pem: str = ""  # shown once; never stored, logged or audited

    def __repr__(self) -> str:
        return f"GeneratedCertificate(certificate={self.certificate!r}, private_key_pem=<withheld>)"


class CertificateStore(ResourceStore[DeviceCertificate], Protocol):
    async def find_by_fingerprint(self, fingerprint: str) -> DeviceCertificate | None: ...


class RevocationStore(Protocol):
    async def insert(self, revocation: Revocation) -> None:
        """Raises AlreadyExists when the certificate is already revoked."""

    async def get(self, serial: str) -> Revocation | None: ...

    async def get_many(self, serials: Sequence[str]) -> dict[str, Revocation]: ...


def require_internal(principal: Principal, action: str) -> None:
    """Defence in depth: the authenticator already admits only the mesh credential to internal methods."""
    if not principal.is_internal:
        raise PermissionDenied(f"only platform services may {action}", reason="INTERNAL_ONLY")


class CertificateService:
    def __init__(
        self,
        authority: CertificateAuthority,
        certificates: CertificateStore,
        revocations: RevocationStore,
        registry: DeviceRegistry,
        trail: AuditTrail,
        settings: CertificateSettings,
        clock: Clock = now,
    ) -> None:
        self._authority = authority
        self._certificates = certificates
        self._revocations = revocations
        self._registry = registry
        self._trail = trail
        self._settings = settings
        self._clock = clock

    async def issue(self, device: str, csr_pem: str, validity: timedelta | None = None) -> DeviceCertificate:
        principal = current_principal()
        assignment = await authorize_device(
            self._registry, principal, device, roles=CERTIFICATE_ROLES, action="issue device certificates"
        )
        device_id = parse_device_name(assignment.device)
        request = parse_csr(csr_pem, device_id)
        lifetime = require_validity(validity, default=self._settings.default_validity)
        certificate = await self._issue(principal, assignment, request.public_key, request.key_type, lifetime)
        await audit(
            self._trail,
            assignment.organization,
            certificate.name,
            description=f"certificate issued from a CSR ({certificate.key_type}, {_expiry(certificate)})",
        )
        return certificate

    async def generate(self, device: str, validity: timedelta | None = None) -> GeneratedCertificate:
        principal = current_principal()
        assignment = await authorize_device(
            self._registry, principal, device, roles=CERTIFICATE_ROLES, action="issue device certificates"
        )
        if not self._settings.allow_generate:
            raise FailedPrecondition(
                "this deployment issues certificates only from CSRs made on the device",
                reason="CERTIFICATE_GENERATION_DISABLED",
            )
        lifetime = require_validity(validity, default=self._settings.default_validity)
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = await self._issue(principal, assignment, key.public_key(), _CURVES["secp256r1"], lifetime)
        await audit(
            self._trail,
            assignment.organization,
            certificate.name,
            description=f"certificate issued with a server-generated key ({_expiry(certificate)})",
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return GeneratedCertificate(certificate, pem)

    async def get(self, name: str) -> DeviceCertificate:
        device, serial = parse_certificate_name(name)
        assignment = await authorize_device(
            self._registry,
            current_principal(),
            device,
            roles=CERTIFICATE_ROLES,
            action="read device certificates",
            field="name",
            resource=name,
        )
        certificate = await self._find(assignment, serial)
        return replace(certificate, revocation=await self._revocations.get(serial))

    async def list_certificates(
        self, parent: str, filter_text: str, page_size: int, page_token: str
    ) -> CertificatePage:
        assignment = await authorize_device(
            self._registry,
            current_principal(),
            parent,
            roles=CERTIFICATE_ROLES,
            action="list device certificates",
            field="parent",
        )
        scope = [
            Condition("device_id", True, parse_device_name(assignment.device)),
            Condition("device_registration", True, assignment.registration),
        ]
        found, token = await list_page(self._certificates, filter_text, FILTER_FIELDS, page_size, page_token, scope)
        revocations = await self._revocations.get_many([c.id for c in found]) if found else {}
        return CertificatePage([replace(c, revocation=revocations.get(c.id)) for c in found], token)

    async def revoke(self, name: str, reason: RevocationReason = RevocationReason.UNSPECIFIED) -> DeviceCertificate:
        device, serial = parse_certificate_name(name)
        principal = current_principal()
        assignment = await authorize_device(
            self._registry,
            principal,
            device,
            roles=CERTIFICATE_ROLES,
            action="revoke device certificates",
            field="name",
            resource=name,
        )
        certificate = await self._find(assignment, serial)
        revocation = Revocation(serial, certificate.device_id, self._clock(), reason, principal.subject)
        try:
            await self._revocations.insert(revocation)
        except AlreadyExists:
            raise FailedPrecondition(
                f"certificate {name!r} is already revoked",
                reason="CERTIFICATE_ALREADY_REVOKED",
                metadata={"certificate": name},
            ) from None
        await audit(self._trail, assignment.organization, name, description=f"certificate revoked ({reason})")
        return replace(certificate, revocation=revocation)

    async def check(self, *, pem: str = "", der: bytes = b"", fingerprint: str = "") -> CertificateCheck:
        """Whether a presented certificate (PEM, DER or its SHA-256 fingerprint) may connect now.

        Every device connect asks this, so the reads it makes (the record, its revocation, the
        device) go out together rather than one after another."""
        require_internal(current_principal(), "check device certificates")
        if fingerprint:
            record = await self._certificates.find_by_fingerprint(normalize_fingerprint(fingerprint))
            if record is None:
                return CertificateCheck(None, CheckFailure.UNKNOWN)
            # The CA may have been replaced since: its old certificates no longer count.
            if not self._authority.issued(x509.load_pem_x509_certificate(record.pem.encode())):
                return CertificateCheck(None, CheckFailure.WRONG_ISSUER)
            revocation, assignment = await asyncio.gather(
                self._revocations.get(record.id), self._registry.get_assignment(record.device)
            )
            return self._verdict(record, revocation, assignment)
        presented = parse_presented(pem, der)
        if not self._authority.issued(presented):
            return CertificateCheck(None, CheckFailure.WRONG_ISSUER)
        serial = serial_id(presented.serial_number)
        # The device is the subject's common name in what this CA issues; the record says for sure.
        device = _device_named_in(presented)
        record, revocation, assignment = await asyncio.gather(
            self._certificates.get(serial),
            self._revocations.get(serial),
            self._registry.get_assignment(device) if device else _nothing(),
        )
        if record is None or record.sha256_fingerprint != fingerprint_of(presented):
            return CertificateCheck(None, CheckFailure.UNKNOWN)
        if record.device != device:
            assignment = await self._registry.get_assignment(record.device)
        return self._verdict(record, revocation, assignment)

    def _verdict(
        self, record: DeviceCertificate, revocation: Revocation | None, assignment: DeviceAssignment | None
    ) -> CertificateCheck:
        at = self._clock()
        if revocation is not None:
            return CertificateCheck(None, CheckFailure.REVOKED)
        if at < record.not_before:
            return CertificateCheck(None, CheckFailure.NOT_YET_VALID)
        if at > record.not_after:
            return CertificateCheck(None, CheckFailure.EXPIRED)
        if assignment is None or assignment.registration != record.device_registration:
            return CertificateCheck(None, CheckFailure.DEVICE_NOT_FOUND)
        return CertificateCheck(record)

    async def _issue(
        self,
        principal: Principal,
        assignment: DeviceAssignment,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        key_type: str,
        validity: timedelta,
    ) -> DeviceCertificate:
        device_id = parse_device_name(assignment.device)
        for attempt in range(_ISSUE_ATTEMPTS):
            at = self._clock()
            issued = self._authority.issue(device_id, public_key, at, validity)
            record = certificate_record(issued, assignment, key_type, at, principal.subject)
            try:
                await self._certificates.insert(record)
            except AlreadyExists:
                if attempt + 1 == _ISSUE_ATTEMPTS:
                    raise
                continue
            return record
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _find(self, assignment: DeviceAssignment, serial: str) -> DeviceCertificate:
        certificate = await self._certificates.get(serial)
        # Serials are unique across devices; one under another device's name, or issued to an earlier
        # registration of this serial (perhaps another organization's), does not exist here.
        if (
            certificate is None
            or certificate.device != assignment.device
            or certificate.device_registration != assignment.registration
        ):
            name = assignment.device + CERTIFICATES + serial
            raise NotFound(
                f"certificate {name!r} does not exist", reason="CERTIFICATE_NOT_FOUND", metadata={"certificate": name}
            )
        return certificate
