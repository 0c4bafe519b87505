"""CertificateService against in-memory fakes: who may issue, read and revoke a device's certificates
(owner and care organization, PERMISSION_DENIED before NOT_FOUND), one audit event per change,
listing, atomic revocation, and the adapter's CheckCertificate."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medmesh.runtime.audit import AuditActor, RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.device.certificates import (
    CertificateAuthority,
    CertificateService,
    CertificateSettings,
    CertificateState,
    CheckFailure,
    DeviceAssignment,
    RevocationReason,
    fingerprint_of,
)
from tests.unit.test_device_credentials_fakes import (
    CARE,
    CARED,
    MISSING,
    OTHER,
    OWNED,
    OWNER,
    PATIENT_NAME,
    FakeCertificateStore,
    FakeClock,
    FakeDeviceRegistry,
    FakeRevocationStore,
    make_authority,
    make_csr,
    member,
)

ADAPTER = internal_principal("mqtt_adapter")
OWNER_ADMIN = member(Role.ORGANIZATION_ADMIN)
OWNER_OPERATOR = member(Role.OPERATOR)
PLATFORM_ADMIN = member(Role.PLATFORM_ADMIN)
CARE_ADMIN = member(Role.ORGANIZATION_ADMIN, CARE)
CARE_OPERATOR = member(Role.OPERATOR, CARE)
OTHER_ADMIN = member(Role.ORGANIZATION_ADMIN, OTHER)
OWNER_CLINICIAN = member(Role.CLINICIAN)
CARE_PATIENT = member(Role.PATIENT, CARE, patient=PATIENT_NAME)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return make_authority(tmp_path_factory.mktemp("device-ca"))


@pytest.fixture
def registry() -> FakeDeviceRegistry:
    return FakeDeviceRegistry()


@pytest.fixture
def store() -> FakeCertificateStore:
    return FakeCertificateStore()


@pytest.fixture
def revocations() -> FakeRevocationStore:
    return FakeRevocationStore()


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("device")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings() -> CertificateSettings:
    return CertificateSettings(Path("unused.crt"), Path("unused.key"), timedelta(days=365), allow_generate=True)


@pytest.fixture
def service(
    authority: CertificateAuthority,
    store: FakeCertificateStore,
    revocations: FakeRevocationStore,
    registry: FakeDeviceRegistry,
    trail: RecordingAuditTrail,
    settings: CertificateSettings,
    clock: FakeClock,
) -> CertificateService:
    return CertificateService(authority, store, revocations, registry, trail, settings, clock)


@pytest.fixture(autouse=True)
def as_owner_admin() -> Iterator[None]:
    """Tests act as the owner's admin unless they say otherwise."""
    with acting_as(OWNER_ADMIN):
        yield


def csr_for(device: str) -> str:
    return make_csr([device.removeprefix("devices/")])[0]


def actor_of(principal: Principal) -> AuditActor:
    return AuditActor(principal.subject, principal.organization, str(principal.role))


# --- issue ------------------------------------------------------------------------------------------


async def test_issue_from_a_csr_stores_the_certificate_and_audits_it(
    service: CertificateService, store: FakeCertificateStore, trail: RecordingAuditTrail, clock: FakeClock
) -> None:
    pem, key = make_csr(["SN-OWNED"])

    issued = await service.issue(OWNED, pem)

    assert issued.name == f"{OWNED}/certificates/{issued.id}"
    assert store.items == {issued.id: issued}
    certificate = x509.load_pem_x509_certificate(issued.pem.encode())
    assert format(certificate.serial_number, "x") == issued.id
    assert certificate.public_key() == key.public_key()
    assert (issued.subject, issued.key_type, issued.state) == ("CN=SN-OWNED", "EC P-256", CertificateState.ACTIVE)
    assert issued.sha256_fingerprint == fingerprint_of(certificate)
    assert issued.not_after == certificate.not_valid_after_utc
    assert issued.not_after - clock.at < timedelta(days=365, seconds=1)
    assert (issued.create_time, issued.issued_by) == (clock.at, OWNER_ADMIN.subject)
    [event] = trail.events
    assert (event.organization, event.resource, event.actor) == (OWNER, issued.name, actor_of(OWNER_ADMIN))
    assert "EC P-256" in event.description


async def test_issue_with_a_validity(service: CertificateService, clock: FakeClock) -> None:
    issued = await service.issue(OWNED, csr_for(OWNED), timedelta(days=30))

    assert issued.not_after == (clock.at + timedelta(days=30)).replace(microsecond=0)


async def test_issue_uses_the_configured_default_validity(
    authority: CertificateAuthority,
    store: FakeCertificateStore,
    revocations: FakeRevocationStore,
    registry: FakeDeviceRegistry,
    trail: RecordingAuditTrail,
    clock: FakeClock,
) -> None:
    settings = CertificateSettings(Path("x"), Path("y"), timedelta(days=7))
    service = CertificateService(authority, store, revocations, registry, trail, settings, clock)

    issued = await service.issue(OWNED, csr_for(OWNED))

    assert issued.not_after == (clock.at + timedelta(days=7)).replace(microsecond=0)


async def test_issue_refuses_a_csr_for_another_device(
    service: CertificateService, store: FakeCertificateStore, trail: RecordingAuditTrail
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.issue(OWNED, csr_for(CARED))

    assert caught.value.reason == "CSR_SUBJECT_MISMATCH"
    assert store.items == {}
    assert trail.events == []


async def test_issue_refuses_a_validity_out_of_bounds(service: CertificateService, store: FakeCertificateStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.issue(OWNED, csr_for(OWNED), timedelta(minutes=5))

    assert caught.value.reason == "INVALID_VALIDITY"
    assert store.items == {}


async def test_a_serial_collision_is_retried_with_a_new_serial(
    service: CertificateService, store: FakeCertificateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    serials = iter([0xABC, 0xABC, 0xDEF])
    monkeypatch.setattr(x509, "random_serial_number", lambda: next(serials))

    first = await service.issue(OWNED, csr_for(OWNED))
    second = await service.issue(OWNED, csr_for(OWNED))

    assert (first.id, second.id) == ("abc", "def")
    assert sorted(store.items) == ["abc", "def"]


async def test_generate_returns_the_only_copy_of_a_new_key(
    service: CertificateService, store: FakeCertificateStore, trail: RecordingAuditTrail
) -> None:
    generated = await service.generate(CARED)

    key = serialization.load_pem_private_key(generated.private_key_pem.encode(), password=None)
    certificate = x509.load_pem_x509_certificate(generated.certificate.pem.encode())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert certificate.public_key() == key.public_key()
    assert generated.certificate.key_type == "EC P-256"
    assert store.items == {generated.certificate.id: generated.certificate}
    # The key is in the answer only: not stored, not audited, not in a repr that may reach a log.
    assert "PRIVATE KEY" not in repr(store.items)
    assert "PRIVATE KEY" not in repr(trail.events)
    assert "PRIVATE KEY" not in repr(generated)
    [event] = trail.events
    assert (event.organization, event.resource) == (OWNER, generated.certificate.name)


async def test_generate_can_be_switched_off(
    authority: CertificateAuthority,
    store: FakeCertificateStore,
    revocations: FakeRevocationStore,
    registry: FakeDeviceRegistry,
    trail: RecordingAuditTrail,
) -> None:
    settings = CertificateSettings(Path("x"), Path("y"), allow_generate=False)
    service = CertificateService(authority, store, revocations, registry, trail, settings)

    with pytest.raises(FailedPrecondition) as caught:
        await service.generate(OWNED)

    assert caught.value.reason == "CERTIFICATE_GENERATION_DISABLED"
    assert (store.items, trail.events) == ({}, [])


# --- access -----------------------------------------------------------------------------------------

ALLOWED = "allowed"
ROLE = "ROLE_NOT_ALLOWED"
ACCESS = "ORGANIZATION_ACCESS_DENIED"


@pytest.mark.parametrize(
    ("principal", "device", "expected"),
    [
        (OWNER_ADMIN, OWNED, ALLOWED),
        (OWNER_OPERATOR, OWNED, ALLOWED),
        (OWNER_ADMIN, CARED, ALLOWED),
        (CARE_ADMIN, CARED, ALLOWED),
        (CARE_OPERATOR, CARED, ALLOWED),
        (PLATFORM_ADMIN, OWNED, ALLOWED),
        (CARE_ADMIN, OWNED, ACCESS),  # OWNED is in no care organization
        (OTHER_ADMIN, CARED, ACCESS),
        (OWNER_CLINICIAN, OWNED, ROLE),
        (CARE_PATIENT, CARED, ROLE),
        (OTHER_ADMIN, MISSING, ACCESS),  # the same answer as for a device that exists elsewhere
        (OWNER_ADMIN, MISSING, ACCESS),
    ],
)
async def test_who_may_issue(
    service: CertificateService,
    store: FakeCertificateStore,
    trail: RecordingAuditTrail,
    principal: Principal,
    device: str,
    expected: str,
) -> None:
    with acting_as(principal):
        if expected == ALLOWED:
            issued = await service.issue(device, csr_for(device))
            assert issued.device == device
            [event] = trail.events
            assert (event.organization, event.actor) == (OWNER, actor_of(principal))
            return
        with pytest.raises(PermissionDenied) as caught:
            await service.issue(device, csr_for(device))
    assert caught.value.reason == expected
    assert (store.items, trail.events) == ({}, [])


async def test_platform_admins_are_told_a_device_does_not_exist(service: CertificateService) -> None:
    with acting_as(PLATFORM_ADMIN), pytest.raises(NotFound) as caught:
        await service.issue(MISSING, csr_for(MISSING))

    assert caught.value.reason == "DEVICE_NOT_FOUND"


async def test_access_is_refused_before_the_csr_is_looked_at(service: CertificateService) -> None:
    with acting_as(OTHER_ADMIN), pytest.raises(PermissionDenied):
        await service.issue(CARED, "not a csr")


async def test_access_follows_the_current_assignment(service: CertificateService, registry: FakeDeviceRegistry) -> None:
    issued = await service.issue(CARED, csr_for(CARED))
    registry.assignments[CARED] = DeviceAssignment(CARED, OWNER)  # care assignment ended

    with acting_as(CARE_ADMIN), pytest.raises(PermissionDenied):
        await service.get(issued.name)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get(f"{MISSING}/certificates/abc"),
        lambda s: s.list_certificates(MISSING, "", 0, ""),
        lambda s: s.revoke(f"{MISSING}/certificates/abc"),
        lambda s: s.generate(MISSING),
    ],
    ids=["get", "list", "revoke", "generate"],
)
async def test_permission_denied_before_not_found(service: CertificateService, call: Any) -> None:
    with acting_as(OTHER_ADMIN), pytest.raises(PermissionDenied):
        await call(service)
    with acting_as(PLATFORM_ADMIN), pytest.raises(NotFound) as caught:
        await call(service)
    assert caught.value.reason == "DEVICE_NOT_FOUND"


# --- read -------------------------------------------------------------------------------------------


async def test_get_a_certificate(service: CertificateService) -> None:
    issued = await service.issue(CARED, csr_for(CARED))

    with acting_as(CARE_OPERATOR):
        assert await service.get(issued.name) == issued


async def test_a_certificate_under_another_device_name_does_not_exist(service: CertificateService) -> None:
    issued = await service.issue(CARED, csr_for(CARED))

    with pytest.raises(NotFound) as caught:
        await service.get(f"{OWNED}/certificates/{issued.id}")

    assert caught.value.reason == "CERTIFICATE_NOT_FOUND"


async def test_list_pages_through_one_device_only(service: CertificateService) -> None:
    mine = [await service.issue(OWNED, csr_for(OWNED)) for _ in range(3)]
    await service.issue(CARED, csr_for(CARED))

    first = await service.list_certificates(OWNED, "", 2, "")
    second = await service.list_certificates(OWNED, "", 2, first.next_page_token)

    assert first.next_page_token
    assert second.next_page_token == ""
    assert [c.id for c in first.certificates + second.certificates] == sorted(c.id for c in mine)


async def test_list_shows_revocations_and_filters_by_expiry(service: CertificateService, clock: FakeClock) -> None:
    short = await service.issue(OWNED, csr_for(OWNED), timedelta(days=10))
    long = await service.issue(OWNED, csr_for(OWNED), timedelta(days=100))
    await service.revoke(short.name, RevocationReason.SUPERSEDED)
    cutoff = (clock.at + timedelta(days=50)).strftime("%Y-%m-%dT%H:%M:%SZ")

    everything = await service.list_certificates(OWNED, "", 0, "")
    expiring = await service.list_certificates(OWNED, f'not_after_time < "{cutoff}"', 0, "")

    states = {c.id: c.state for c in everything.certificates}
    assert states == {short.id: CertificateState.REVOKED, long.id: CertificateState.ACTIVE}
    assert [c.id for c in expiring.certificates] == [short.id]
    assert expiring.certificates[0].revocation is not None


async def test_list_filters_by_fingerprint(service: CertificateService) -> None:
    one = await service.issue(OWNED, csr_for(OWNED))
    await service.issue(OWNED, csr_for(OWNED))

    page = await service.list_certificates(OWNED, f'sha256_fingerprint = "{one.sha256_fingerprint.upper()}"', 0, "")

    assert [c.id for c in page.certificates] == [one.id]


@pytest.mark.parametrize("text", ['device_id = "SN-CARE"', 'not_after_time < "tomorrow"', 'pem = "x"'])
async def test_list_refuses_other_filters(service: CertificateService, text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.list_certificates(OWNED, text, 0, "")

    assert caught.value.reason == "INVALID_FILTER"


async def test_reading_changes_nothing_and_audits_nothing(
    service: CertificateService, trail: RecordingAuditTrail
) -> None:
    issued = await service.issue(OWNED, csr_for(OWNED))
    trail.events.clear()

    await service.get(issued.name)
    await service.list_certificates(OWNED, "", 0, "")

    assert trail.events == []


# --- revoke -----------------------------------------------------------------------------------------


async def test_revoke(service: CertificateService, trail: RecordingAuditTrail, clock: FakeClock) -> None:
    issued = await service.issue(CARED, csr_for(CARED))
    clock.advance(timedelta(hours=1))

    with acting_as(CARE_ADMIN):
        revoked = await service.revoke(issued.name, RevocationReason.KEY_COMPROMISE)

    assert revoked.state is CertificateState.REVOKED
    assert revoked.revocation is not None
    assert (revoked.revocation.revoke_time, revoked.revocation.reason) == (clock.at, RevocationReason.KEY_COMPROMISE)
    assert revoked.revocation.revoked_by == CARE_ADMIN.subject
    assert await service.get(issued.name) == revoked
    assert len(trail.events) == 2
    event = trail.events[-1]
    assert (event.organization, event.resource, event.actor) == (OWNER, issued.name, actor_of(CARE_ADMIN))
    assert "KEY_COMPROMISE" in event.description


async def test_revoking_twice_is_refused_and_audited_once(
    service: CertificateService, trail: RecordingAuditTrail
) -> None:
    issued = await service.issue(OWNED, csr_for(OWNED))
    first = await service.revoke(issued.name, RevocationReason.SUPERSEDED)

    with pytest.raises(FailedPrecondition) as caught:
        await service.revoke(issued.name, RevocationReason.KEY_COMPROMISE)

    assert caught.value.reason == "CERTIFICATE_ALREADY_REVOKED"
    assert await service.get(issued.name) == first
    assert len(trail.events) == 2


async def test_concurrent_revocations_one_wins(service: CertificateService, trail: RecordingAuditTrail) -> None:
    issued = await service.issue(OWNED, csr_for(OWNED))
    trail.events.clear()

    results = await asyncio.gather(
        *(service.revoke(issued.name, reason) for reason in RevocationReason), return_exceptions=True
    )

    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, DomainError)]
    assert len(winners) == 1
    assert len(losers) == len(RevocationReason) - 1
    assert len(trail.events) == 1


async def test_revoke_an_unknown_certificate(service: CertificateService) -> None:
    with pytest.raises(NotFound) as caught:
        await service.revoke(f"{OWNED}/certificates/abc")

    assert caught.value.reason == "CERTIFICATE_NOT_FOUND"


async def test_only_managers_revoke(service: CertificateService) -> None:
    issued = await service.issue(OWNED, csr_for(OWNED))

    with acting_as(OWNER_CLINICIAN), pytest.raises(PermissionDenied) as caught:
        await service.revoke(issued.name)

    assert caught.value.reason == ROLE


# --- CheckCertificate -------------------------------------------------------------------------------


async def issue_as_admin(service: CertificateService, device: str = OWNED) -> tuple[str, bytes, str, str]:
    """(PEM, DER, fingerprint, name) of a fresh certificate of `device`."""
    issued = await service.issue(device, csr_for(device))
    der = x509.load_pem_x509_certificate(issued.pem.encode()).public_bytes(serialization.Encoding.DER)
    return issued.pem, der, issued.sha256_fingerprint, issued.name


async def test_check_a_valid_certificate_every_way(service: CertificateService) -> None:
    pem, der, fingerprint, name = await issue_as_admin(service)
    colons = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()

    with acting_as(ADAPTER):
        checks = [
            await service.check(pem=pem),
            await service.check(der=der),
            await service.check(fingerprint=fingerprint),
            await service.check(fingerprint=colons),
        ]

    for check in checks:
        assert check.valid
        assert check.certificate is not None
        assert (check.certificate.name, check.certificate.device) == (name, OWNED)


async def test_check_a_revoked_certificate(service: CertificateService) -> None:
    pem, _, fingerprint, name = await issue_as_admin(service)
    await service.revoke(name)

    with acting_as(ADAPTER):
        by_pem = await service.check(pem=pem)
        by_fingerprint = await service.check(fingerprint=fingerprint)

    assert (by_pem.valid, by_pem.failure, by_pem.certificate) == (False, CheckFailure.REVOKED, None)
    assert by_fingerprint.failure is CheckFailure.REVOKED


@pytest.mark.parametrize(
    ("shift", "failure"),
    [
        (timedelta(days=366), CheckFailure.EXPIRED),
        (timedelta(minutes=-6), CheckFailure.NOT_YET_VALID),  # backdated by five minutes only
        (timedelta(minutes=-4), None),
        (timedelta(days=364), None),
    ],
)
async def test_check_validity_period(
    service: CertificateService, clock: FakeClock, shift: timedelta, failure: CheckFailure | None
) -> None:
    pem, *_ = await issue_as_admin(service)
    clock.advance(shift)

    with acting_as(ADAPTER):
        check = await service.check(pem=pem)

    assert check.failure is failure


async def test_check_a_certificate_of_another_ca(service: CertificateService, tmp_path: Path) -> None:
    foreign = make_authority(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = foreign.issue("SN-OWNED", key.public_key(), FakeClock().at, timedelta(days=1))

    with acting_as(ADAPTER):
        check = await service.check(pem=certificate.public_bytes(serialization.Encoding.PEM).decode())

    assert check.failure is CheckFailure.WRONG_ISSUER


async def test_check_a_certificate_of_ours_that_was_never_recorded(
    service: CertificateService, authority: CertificateAuthority
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = authority.issue("SN-OWNED", key.public_key(), FakeClock().at, timedelta(days=1))

    with acting_as(ADAPTER):
        by_pem = await service.check(pem=certificate.public_bytes(serialization.Encoding.PEM).decode())
        by_fingerprint = await service.check(fingerprint=fingerprint_of(certificate))

    assert by_pem.failure is CheckFailure.UNKNOWN
    assert by_fingerprint.failure is CheckFailure.UNKNOWN


async def test_check_after_the_ca_was_replaced(
    store: FakeCertificateStore,
    revocations: FakeRevocationStore,
    registry: FakeDeviceRegistry,
    trail: RecordingAuditTrail,
    settings: CertificateSettings,
    authority: CertificateAuthority,
    tmp_path: Path,
) -> None:
    old = CertificateService(authority, store, revocations, registry, trail, settings)
    pem, _, fingerprint, _ = await issue_as_admin(old)
    new = CertificateService(make_authority(tmp_path), store, revocations, registry, trail, settings)

    with acting_as(ADAPTER):
        assert (await new.check(fingerprint=fingerprint)).failure is CheckFailure.WRONG_ISSUER
        assert (await new.check(pem=pem)).failure is CheckFailure.WRONG_ISSUER


async def test_check_a_certificate_of_a_deleted_device(
    service: CertificateService, registry: FakeDeviceRegistry
) -> None:
    pem, *_ = await issue_as_admin(service, CARED)
    del registry.assignments[CARED]

    with acting_as(ADAPTER):
        check = await service.check(pem=pem)

    assert check.failure is CheckFailure.DEVICE_NOT_FOUND


async def test_check_a_record_whose_serial_matches_but_content_does_not(
    service: CertificateService, store: FakeCertificateStore
) -> None:
    """Defence in depth: the stored record must be this very certificate, not just its serial."""
    pem, _, _, name = await issue_as_admin(service)
    serial = name.rsplit("/", 1)[1]
    store.put(replace(store.items[serial], sha256_fingerprint="0" * 64))

    with acting_as(ADAPTER):
        check = await service.check(pem=pem)

    assert check.failure is CheckFailure.UNKNOWN


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pem": "garbage"}, "pem"),
        ({"der": b"\x30\x03\x02\x01\x01"}, "der"),
        ({"fingerprint": "abc"}, "sha256_fingerprint"),
    ],
)
async def test_check_bad_input(service: CertificateService, kwargs: dict[str, Any], field: str) -> None:
    with acting_as(ADAPTER), pytest.raises(InvalidArgument) as caught:
        await service.check(**kwargs)

    assert [v.field for v in caught.value.field_violations] == [field]


async def test_only_platform_services_check(service: CertificateService) -> None:
    pem, *_ = await issue_as_admin(service)

    with acting_as(PLATFORM_ADMIN), pytest.raises(PermissionDenied) as caught:
        await service.check(pem=pem)

    assert caught.value.reason == "INTERNAL_ONLY"


# --- a serial deleted and registered again ----------------------------------------------------------


async def test_certificates_of_an_earlier_registration_are_gone(
    service: CertificateService, registry: FakeDeviceRegistry
) -> None:
    """Manufacturer serials come back (a device returned and registered anew, perhaps by another
    organization): what was issued to the earlier registration neither connects nor shows."""
    pem, _, fingerprint, name = await issue_as_admin(service, OWNED)
    registry.register_again(OWNED, OTHER)

    with acting_as(ADAPTER):
        assert (await service.check(pem=pem)).failure is CheckFailure.DEVICE_NOT_FOUND
        assert (await service.check(fingerprint=fingerprint)).failure is CheckFailure.DEVICE_NOT_FOUND
    with acting_as(OTHER_ADMIN):
        assert (await service.list_certificates(OWNED, "", 0, "")).certificates == []
        with pytest.raises(NotFound):
            await service.get(name)
        with pytest.raises(NotFound):
            await service.revoke(name)
        fresh = await service.issue(OWNED, csr_for(OWNED))
        assert [c.id for c in (await service.list_certificates(OWNED, "", 0, "")).certificates] == [fresh.id]
    with acting_as(ADAPTER):
        assert (await service.check(pem=fresh.pem)).valid
