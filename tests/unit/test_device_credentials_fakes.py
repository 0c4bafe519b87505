"""Fakes and helpers shared by the device certificate and temporary-credential tests (no tests here).

The stores extend the shared `InMemoryRepository` with the few queries the credential
repositories add; the registry stands in for the device repository behind `DeviceRegistry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from medmesh.launcher.tls import ensure_device_ca
from medmesh.runtime.auth import Principal, Role
from medmesh.runtime.resources import now
from services.device.certificates import (
    CertificateAuthority,
    DeviceAssignment,
    DeviceCertificate,
    Revocation,
)
from services.device.credentials import TemporaryCredential
from tests.unit.fakes import InMemoryRepository

MANUFACTURER = "organizations/manufacturer"
OWNER = "organizations/owner"  # owns the devices
CARE = "organizations/care"  # where SN-CARE is in use
OTHER = "organizations/other"  # has nothing to do with either device
PATIENT_NAME = f"{CARE}/patients/p-1"

OWNED = "devices/SN-OWNED"  # owner only
CARED = "devices/SN-CARE"  # owner + care organization + patient
MISSING = "devices/SN-MISSING"

ASSIGNMENTS = {
    OWNED: DeviceAssignment(OWNED, OWNER, registration="uid-owned"),
    CARED: DeviceAssignment(CARED, OWNER, CARE, PATIENT_NAME, registration="uid-cared"),
}


def member(role: Role, organization: str = OWNER, patient: str = "") -> Principal:
    if role is Role.PLATFORM_ADMIN:
        organization = MANUFACTURER
    return Principal(f"{organization}/users/{role.value}", organization, role, patient=patient)


class FakeClock:
    """`now()` that a test moves."""

    def __init__(self, at: datetime | None = None) -> None:
        self.at = at or now()

    def __call__(self) -> datetime:
        return self.at

    def advance(self, by: timedelta) -> None:
        self.at += by


class FakeDeviceRegistry:
    def __init__(self, assignments: dict[str, DeviceAssignment] | None = None) -> None:
        self.assignments = dict(ASSIGNMENTS if assignments is None else assignments)
        self.asked: list[str] = []

    async def get_assignment(self, device: str) -> DeviceAssignment | None:
        self.asked.append(device)
        return self.assignments.get(device)

    def register_again(self, device: str, organization: str) -> None:
        """The serial deleted and registered anew (a new uid), by `organization`."""
        self.assignments[device] = DeviceAssignment(device, organization, registration=f"uid-again-{device}")


class FakeCertificateStore(InMemoryRepository[DeviceCertificate]):
    def __init__(self) -> None:
        super().__init__("certificate")

    async def find_by_fingerprint(self, fingerprint: str) -> DeviceCertificate | None:
        return next((c for c in self.items.values() if c.sha256_fingerprint == fingerprint), None)


class FakeRevocationStore(InMemoryRepository[Revocation]):
    def __init__(self) -> None:
        super().__init__("revocation")

    async def get_many(self, serials: Sequence[str]) -> dict[str, Revocation]:
        return {serial: self.items[serial] for serial in serials if serial in self.items}


class FakeCredentialStore(InMemoryRepository[TemporaryCredential]):
    def __init__(self) -> None:
        super().__init__("temporary_credential")

    async def delete_expired(self, before: datetime) -> int:
        expired = [key for key, item in self.items.items() if item.expire_time < before]
        for key in expired:
            del self.items[key]
        return len(expired)


def make_authority(directory: Path) -> CertificateAuthority:
    cert_file, key_file = ensure_device_ca(directory)
    return CertificateAuthority.load(cert_file, key_file)


def make_csr(
    common_names: Iterable[str] = ("SN-OWNED",),
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    *,
    extra: Iterable[x509.NameAttribute[str]] = (),
) -> tuple[str, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    """A PEM CSR signed by `key` (a new EC P-256 key when None), and the key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    attributes = [*extra, *(x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names)]
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key
