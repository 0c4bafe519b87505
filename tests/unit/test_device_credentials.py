"""TemporaryCredentialService against in-memory fakes: who may obtain credentials for a device, what
is stored (never the password), the TTL, one audit event without the password, verification for
the adapter, and the sweep of expired credentials."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from medmesh.runtime.audit import AuditActor, RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from services.device.credentials import (
    DEFAULT_TTL,
    TemporaryCredentialService,
    VerifyFailure,
)
from tests.unit.test_device_credentials_fakes import (
    CARE,
    CARED,
    MISSING,
    OTHER,
    OWNED,
    OWNER,
    PATIENT_NAME,
    FakeClock,
    FakeCredentialStore,
    FakeDeviceRegistry,
    member,
)

ADAPTER = internal_principal("mqtt_adapter")
CARE_PATIENT = member(Role.PATIENT, CARE, patient=PATIENT_NAME)
ANOTHER_PATIENT = member(Role.PATIENT, CARE, patient=f"{CARE}/patients/p-2")


@pytest.fixture
def registry() -> FakeDeviceRegistry:
    return FakeDeviceRegistry()


@pytest.fixture
def store() -> FakeCredentialStore:
    return FakeCredentialStore()


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("device")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(
    registry: FakeDeviceRegistry, store: FakeCredentialStore, trail: RecordingAuditTrail, clock: FakeClock
) -> TemporaryCredentialService:
    return TemporaryCredentialService(registry, store, trail, clock)


@pytest.fixture(autouse=True)
def as_a_clinician_of_the_care_organization() -> Iterator[None]:
    with acting_as(member(Role.CLINICIAN, CARE)):
        yield


async def test_create_returns_a_random_password_and_stores_only_its_hash(
    service: TemporaryCredentialService, store: FakeCredentialStore, clock: FakeClock
) -> None:
    issued = await service.create(CARED)

    assert issued.device == CARED
    assert issued.expire_time == clock.at + DEFAULT_TTL == clock.at + timedelta(minutes=15)
    assert issued.username.startswith("tc-")
    assert len(base64.urlsafe_b64decode(issued.password + "=")) == 32
    [stored] = store.items.values()
    assert stored.id == issued.username
    assert (stored.device_id, stored.expire_time, stored.create_time) == ("SN-CARE", issued.expire_time, clock.at)
    assert stored.password_sha256 == hashlib.sha256(issued.password.encode()).hexdigest()
    assert issued.password not in repr(stored)
    assert issued.password not in repr(issued)


async def test_every_call_makes_new_credentials(service: TemporaryCredentialService) -> None:
    first, second = await service.create(CARED), await service.create(CARED)

    assert first.username != second.username
    assert first.password != second.password


async def test_issuance_is_audited_once_without_the_password(
    service: TemporaryCredentialService, trail: RecordingAuditTrail
) -> None:
    issued = await service.create(CARED)

    [event] = trail.events
    # What a relay sends belongs to the care organization: its admins see who could send it.
    assert (event.organization, event.resource) == (CARE, CARED)
    assert event.actor == AuditActor(f"{CARE}/users/clinician", CARE, "clinician")
    assert issued.username in event.description
    assert issued.password not in repr(event)
    assert hashlib.sha256(issued.password.encode()).hexdigest() not in repr(event)


async def test_a_device_in_no_care_organization_audits_to_its_owner(
    service: TemporaryCredentialService, trail: RecordingAuditTrail
) -> None:
    with acting_as(member(Role.OPERATOR)):
        await service.create(OWNED)

    assert [e.organization for e in trail.events] == [OWNER]


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        (None, timedelta(minutes=15)),
        (timedelta(minutes=1), timedelta(minutes=1)),
        (timedelta(hours=24), timedelta(hours=24)),
    ],
)
async def test_ttl(
    service: TemporaryCredentialService, clock: FakeClock, ttl: timedelta | None, expected: timedelta
) -> None:
    issued = await service.create(CARED, ttl)

    assert issued.expire_time - clock.at == expected


@pytest.mark.parametrize("ttl", [timedelta(seconds=59), timedelta(hours=24, seconds=1), timedelta(0)])
async def test_ttl_out_of_bounds(
    service: TemporaryCredentialService, store: FakeCredentialStore, trail: RecordingAuditTrail, ttl: timedelta
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.create(CARED, ttl)

    assert caught.value.reason == "INVALID_TTL"
    assert (store.items, trail.events) == ({}, [])


# --- who may obtain them ----------------------------------------------------------------------------

ALLOWED = "allowed"
ACCESS = "ORGANIZATION_ACCESS_DENIED"


@pytest.mark.parametrize(
    ("principal", "device", "expected"),
    [
        *((member(role), OWNED, ALLOWED) for role in Role if role is not Role.PATIENT),
        *((member(role, CARE), CARED, ALLOWED) for role in (Role.ORGANIZATION_ADMIN, Role.OPERATOR, Role.CLINICIAN)),
        (CARE_PATIENT, CARED, ALLOWED),  # the phone app of the patient the device is assigned to
        (ANOTHER_PATIENT, CARED, ACCESS),
        (CARE_PATIENT, OWNED, ACCESS),  # assigned to nobody
        (CARE_PATIENT, MISSING, ACCESS),
        (member(Role.CLINICIAN, CARE), OWNED, ACCESS),
        (member(Role.ORGANIZATION_ADMIN, OTHER), CARED, ACCESS),
        (member(Role.CLINICIAN, OTHER), MISSING, ACCESS),
    ],
)
async def test_who_may_obtain_credentials(
    service: TemporaryCredentialService,
    store: FakeCredentialStore,
    trail: RecordingAuditTrail,
    principal: Principal,
    device: str,
    expected: str,
) -> None:
    with acting_as(principal):
        if expected == ALLOWED:
            issued = await service.create(device)
            assert issued.device == device
            assert [e.actor.subject for e in trail.events] == [principal.subject]
            return
        with pytest.raises(PermissionDenied) as caught:
            await service.create(device)
    assert caught.value.reason == expected
    assert (store.items, trail.events) == ({}, [])


async def test_platform_admins_are_told_a_device_does_not_exist(service: TemporaryCredentialService) -> None:
    with acting_as(member(Role.PLATFORM_ADMIN)), pytest.raises(NotFound) as caught:
        await service.create(MISSING)

    assert caught.value.reason == "DEVICE_NOT_FOUND"


async def test_a_bad_device_name(service: TemporaryCredentialService) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.create("SN-CARE")

    assert [v.field for v in caught.value.field_violations] == ["device"]


# --- verification -----------------------------------------------------------------------------------


async def test_verify_valid_credentials(service: TemporaryCredentialService) -> None:
    issued = await service.create(CARED)

    with acting_as(ADAPTER):
        check = await service.verify(issued.username, issued.password)

    assert check.valid
    assert (check.device, check.expire_time) == (CARED, issued.expire_time)


async def test_verify_refuses_a_wrong_password(service: TemporaryCredentialService) -> None:
    issued = await service.create(CARED)
    other = await service.create(CARED)

    with acting_as(ADAPTER):
        checks = [
            await service.verify(issued.username, other.password),
            await service.verify(issued.username, ""),
            await service.verify(issued.username, issued.password + "x"),
            await service.verify(issued.username, hashlib.sha256(issued.password.encode()).hexdigest()),
        ]

    for check in checks:
        assert (check.valid, check.failure, check.device, check.expire_time) == (False, VerifyFailure.UNKNOWN, "", None)


async def test_verify_refuses_unknown_usernames_without_a_lookup(
    service: TemporaryCredentialService, store: FakeCredentialStore
) -> None:
    issued = await service.create(CARED)
    store.get = None  # type: ignore[assignment,method-assign]  # a lookup would now fail the test

    with acting_as(ADAPTER):
        for username in ["SN-CARE", "", issued.username.upper(), "tc-" + "0" * 31]:
            assert (await service.verify(username, issued.password)).failure is VerifyFailure.UNKNOWN


async def test_verify_an_unknown_well_formed_username(service: TemporaryCredentialService) -> None:
    with acting_as(ADAPTER):
        check = await service.verify("tc-" + "0" * 32, "whatever")

    assert check.failure is VerifyFailure.UNKNOWN


@pytest.mark.parametrize(
    ("after", "failure"),
    [
        (timedelta(minutes=15) - timedelta(milliseconds=1), None),
        (timedelta(minutes=15), VerifyFailure.EXPIRED),
        (timedelta(days=2), VerifyFailure.EXPIRED),
    ],
)
async def test_verify_refuses_expired_credentials(
    service: TemporaryCredentialService, clock: FakeClock, after: timedelta, failure: VerifyFailure | None
) -> None:
    issued = await service.create(CARED)
    clock.advance(after)

    with acting_as(ADAPTER):
        check = await service.verify(issued.username, issued.password)

    assert check.failure is failure


async def test_verify_refuses_credentials_of_a_deleted_device(
    service: TemporaryCredentialService, registry: FakeDeviceRegistry
) -> None:
    issued = await service.create(CARED)
    del registry.assignments[CARED]

    with acting_as(ADAPTER):
        check = await service.verify(issued.username, issued.password)

    assert check.failure is VerifyFailure.DEVICE_NOT_FOUND


async def test_only_platform_services_verify(service: TemporaryCredentialService) -> None:
    issued = await service.create(CARED)

    with acting_as(member(Role.PLATFORM_ADMIN)), pytest.raises(PermissionDenied) as caught:
        await service.verify(issued.username, issued.password)

    assert caught.value.reason == "INTERNAL_ONLY"


# --- the sweep --------------------------------------------------------------------------------------


async def test_sweep_deletes_only_expired_credentials(
    service: TemporaryCredentialService, store: FakeCredentialStore, clock: FakeClock, trail: RecordingAuditTrail
) -> None:
    short = await service.create(CARED, timedelta(minutes=1))
    long = await service.create(CARED, timedelta(hours=1))
    events = len(trail.events)
    clock.advance(timedelta(minutes=2))

    assert await service.sweep_expired() == 1
    assert await service.sweep_expired() == 0

    assert list(store.items) == [long.username]
    assert short.username not in store.items
    assert len(trail.events) == events


class FlakyStore(FakeCredentialStore):
    def __init__(self) -> None:
        super().__init__()
        self.sweeps: list[datetime] = []

    async def delete_expired(self, before: datetime) -> int:
        self.sweeps.append(before)
        if len(self.sweeps) == 1:
            raise Unavailable("the database is down")
        return await super().delete_expired(before)


async def test_the_sweeper_keeps_going_after_a_failure(
    registry: FakeDeviceRegistry, trail: RecordingAuditTrail
) -> None:
    store = FlakyStore()
    service = TemporaryCredentialService(registry, store, trail)

    task = asyncio.create_task(service.run_sweeper(interval_seconds=0.001))
    for _ in range(200):
        await asyncio.sleep(0.001)
        if len(store.sweeps) >= 3:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert len(store.sweeps) >= 3


async def test_credentials_of_an_earlier_registration_are_refused(
    service: TemporaryCredentialService, registry: FakeDeviceRegistry
) -> None:
    issued = await service.create(CARED)
    registry.register_again(CARED, OTHER)

    with acting_as(ADAPTER):
        check = await service.verify(issued.username, issued.password)

    assert check.failure is VerifyFailure.DEVICE_NOT_FOUND
