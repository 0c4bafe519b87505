"""DeviceService use cases against in-memory fakes; the gRPC organization directory against a local server.

The use-case tests act as a platform admin (see `_as_platform_admin`); who may do what is in
test_device_access.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import field_mask_pb2

from medmesh.device.v1 import device_service_pb2 as pb
from medmesh.organization.v1 import organization_service_pb2_grpc as organization_pb_grpc
from medmesh.runtime.audit import AuditActor, RecordingAuditTrail
from medmesh.runtime.auth import Authenticator, Principal, Role, TokenVerifier, acting_as, current_principal
from medmesh.runtime.clients import peer_channel
from medmesh.runtime.directories import GrpcOrganizationDirectory
from medmesh.runtime.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from medmesh.runtime.interceptors import RequestInterceptor
from medmesh.runtime.resources import now
from services.device.domain import Device, DeviceChanges
from services.device.service import DeviceService
from services.device.servicer import DeviceServicer
from services.organization.domain import Organization, OrganizationKind
from services.organization.service import OrganizationService
from services.organization.servicer import OrganizationServicer
from tests.unit.fakes import FakeOrganizationDirectory, InMemoryRepository

ORG_A = "organizations/a"
ORG_B = "organizations/b"
PLATFORM_ADMIN = Principal(
    subject="organizations/manufacturer/users/admin",
    organization="organizations/manufacturer",
    role=Role.PLATFORM_ADMIN,
)


class RacingRepository(InMemoryRepository[Device]):
    """Another writer bumps the revision right after the service reads: its write must lose."""

    async def get(self, resource_id: str) -> Device | None:
        current = await super().get(resource_id)
        if current is not None:
            self.put(replace(current, model="written meanwhile", revision=current.revision + 1))
        return current


@pytest.fixture(autouse=True)
def _as_platform_admin() -> Iterator[None]:
    # pytest-asyncio runs each test in a copy of the context the fixtures left, so the
    # principal set here is the one the (async) test and the service see.
    with acting_as(PLATFORM_ADMIN):
        yield


@pytest.fixture
def store() -> InMemoryRepository[Device]:
    return InMemoryRepository("device")


@pytest.fixture
def directory() -> FakeOrganizationDirectory:
    return FakeOrganizationDirectory({ORG_A, ORG_B})


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("device")


@pytest.fixture
def service(
    store: InMemoryRepository[Device], directory: FakeOrganizationDirectory, trail: RecordingAuditTrail
) -> DeviceService:
    return DeviceService(store, directory, trail)


def a_device(serial: str, organization: str = ORG_A) -> Device:
    at = now()
    return Device(serial, organization, "Pulse oximeter", "PO-200", at, at)


def only_violation(error: DomainError) -> tuple[str, str]:
    assert len(error.field_violations) == 1, error.field_violations
    violation = error.field_violations[0]
    return violation.field, violation.description


async def all_pages(service: DeviceService, filter_text: str, page_size: int) -> list[list[str]]:
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await service.list_devices(filter_text, page_size, token)
        pages.append([d.id for d in page.devices])
        token = page.next_page_token
        if not token:
            return pages
        assert len(pages) < 100, "paging does not terminate"


async def test_the_fixture_principal_reaches_the_test() -> None:
    # Everything below relies on it; without it every call would be UNAUTHENTICATED.
    assert current_principal() == PLATFORM_ADMIN


# --- create ---------------------------------------------------------------------------------------


async def test_create_registers_the_device_under_its_serial(
    service: DeviceService, store: InMemoryRepository[Device], directory: FakeOrganizationDirectory
) -> None:
    created = await service.create("SN-0001", ORG_A, "  Bed 3 oximeter ", " PO-200 ")

    assert created.id == "SN-0001"
    assert created.name == "devices/SN-0001"
    assert (created.organization, created.display_name, created.model) == (ORG_A, "Bed 3 oximeter", "PO-200")
    assert created.revision == 1
    assert created.create_time == created.update_time
    assert store.items == {"SN-0001": created}
    assert directory.asked == [ORG_A]
    assert await service.get("devices/SN-0001") == created


@pytest.mark.parametrize("serial", ["", "bad id", "-leading-dash", "x" * 65, "a/b"])
async def test_create_rejects_a_bad_serial_before_asking_anyone(
    service: DeviceService, store: InMemoryRepository[Device], directory: FakeOrganizationDirectory, serial: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.create(serial, ORG_A, "", "")

    assert caught.value.reason == "INVALID_DEVICE_ID"
    assert only_violation(caught.value)[0] == "device_id"
    assert store.items == {}
    assert directory.asked == []


@pytest.mark.parametrize(
    ("organization", "reason"),
    [("", "REQUIRED_FIELD"), ("a", "INVALID_NAME"), ("organizations/A", "INVALID_NAME"), ("orgs/a", "INVALID_NAME")],
)
async def test_create_rejects_a_malformed_organization(
    service: DeviceService, directory: FakeOrganizationDirectory, organization: str, reason: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.create("SN-1", organization, "", "")

    assert caught.value.reason == reason
    assert only_violation(caught.value)[0] == "device.organization"
    assert directory.asked == []


async def test_create_for_an_organization_that_does_not_exist_is_failed_precondition(
    service: DeviceService, store: InMemoryRepository[Device]
) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        await service.create("SN-1", "organizations/ghost", "", "")

    assert caught.value.reason == "ORGANIZATION_NOT_FOUND"
    assert caught.value.metadata == {"organization": "organizations/ghost"}
    assert only_violation(caught.value)[0] == "device.organization"
    assert store.items == {}


async def test_create_when_the_organization_directory_is_unavailable(store: InMemoryRepository[Device]) -> None:
    service = DeviceService(store, FakeOrganizationDirectory({ORG_A}, unavailable=True), RecordingAuditTrail())

    with pytest.raises(Unavailable) as caught:
        await service.create("SN-1", ORG_A, "", "")

    assert caught.value.code == "UNAVAILABLE"
    assert caught.value.reason == "ORGANIZATION_SERVICE_UNAVAILABLE"
    assert store.items == {}


async def test_duplicate_create_is_already_exists(service: DeviceService, store: InMemoryRepository[Device]) -> None:
    original = await service.create("SN-1", ORG_A, "First", "PO-200")

    with pytest.raises(AlreadyExists) as caught:
        await service.create("SN-1", ORG_B, "Second", "PO-300")

    assert caught.value.reason == "DEVICE_ALREADY_EXISTS"
    assert caught.value.metadata == {"device": "SN-1"}
    assert store.items == {"SN-1": original}


# --- get ------------------------------------------------------------------------------------------


async def test_get_unknown_is_not_found(service: DeviceService) -> None:
    with pytest.raises(NotFound) as caught:
        await service.get("devices/SN-404")

    assert caught.value.reason == "DEVICE_NOT_FOUND"
    assert caught.value.metadata == {"device": "devices/SN-404"}


@pytest.mark.parametrize("name", ["SN-1", "device/SN-1", "devices/", "devices/bad id", "devices/a/b"])
async def test_get_with_a_malformed_name_is_invalid(service: DeviceService, name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.get(name)
    assert caught.value.reason == "INVALID_NAME"
    assert only_violation(caught.value)[0] == "name"


# --- list -----------------------------------------------------------------------------------------


async def test_list_pages_through_everything_without_gap_or_repeat(
    service: DeviceService, store: InMemoryRepository[Device]
) -> None:
    serials = ["SN-5", "SN-2", "SN-7", "SN-1", "SN-4", "SN-6", "SN-3"]
    for serial in serials:
        store.put(a_device(serial))

    pages = await all_pages(service, "", 3)

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [s for page in pages for s in page] == sorted(serials)


async def test_list_by_organization_and_model(service: DeviceService, store: InMemoryRepository[Device]) -> None:
    store.put(a_device("SN-1", ORG_A))
    store.put(replace(a_device("SN-2", ORG_A), model="PO-300"))
    store.put(a_device("SN-3", ORG_B))
    store.put(a_device("SN-4", ORG_A))

    page = await service.list_devices('organization = "organizations/a" AND model = "PO-200"', 10, "")

    assert [d.id for d in page.devices] == ["SN-1", "SN-4"]


async def test_list_with_not_equal(service: DeviceService, store: InMemoryRepository[Device]) -> None:
    store.put(a_device("SN-1"))
    store.put(replace(a_device("SN-2"), model="PO-300"))
    store.put(replace(a_device("SN-3"), model=""))

    page = await service.list_devices('model != "PO-200"', 10, "")

    assert [d.id for d in page.devices] == ["SN-2", "SN-3"]


async def test_list_by_display_name_with_escaped_quotes(
    service: DeviceService, store: InMemoryRepository[Device]
) -> None:
    store.put(replace(a_device("SN-1"), display_name='Bed "3"'))
    store.put(replace(a_device("SN-2"), display_name="Bed 3"))

    page = await service.list_devices(r'display_name = "Bed \"3\""', 10, "")

    assert [d.id for d in page.devices] == ["SN-1"]


async def test_filtered_paging_across_pages(service: DeviceService, store: InMemoryRepository[Device]) -> None:
    for i in range(9):
        store.put(a_device(f"SN-{i}", ORG_A if i % 3 else ORG_B))

    pages = await all_pages(service, 'organization = "organizations/a"', 4)

    assert pages == [["SN-1", "SN-2", "SN-4", "SN-5"], ["SN-7", "SN-8"]]


@pytest.mark.parametrize(
    "filter_text",
    [
        "kind = KIND_MANUFACTURER",  # an organization field, not a device one
        'serial = "SN-1"',
        'model = "PO-200" OR model = "PO-300"',
        "model = PO-200 AND",
        "model == PO",
        'organization = "organizations/a" model = "PO-200"',  # missing AND
    ],
)
async def test_bad_filter_is_invalid_argument_on_filter(service: DeviceService, filter_text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.list_devices(filter_text, 10, "")

    assert caught.value.reason == "INVALID_FILTER"
    assert only_violation(caught.value)[0] == "filter"


async def test_page_token_cannot_be_reused_with_another_filter(
    service: DeviceService, store: InMemoryRepository[Device]
) -> None:
    for i in range(5):
        store.put(a_device(f"SN-{i}"))
    first = await service.list_devices('model = "PO-200"', 2, "")

    with pytest.raises(InvalidArgument) as caught:
        await service.list_devices('model = "PO-300"', 2, first.next_page_token)

    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert only_violation(caught.value)[0] == "page_token"
    # The same token with its own filter still works.
    second = await service.list_devices('model = "PO-200"', 2, first.next_page_token)
    assert [d.id for d in second.devices] == ["SN-2", "SN-3"]


async def test_garbage_page_token_is_invalid(service: DeviceService) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.list_devices("", 2, "not-a-token")
    assert caught.value.reason == "INVALID_PAGE_TOKEN"


# --- update ---------------------------------------------------------------------------------------


async def test_update_changes_only_masked_fields(service: DeviceService, store: InMemoryRepository[Device]) -> None:
    before = await service.create("SN-1", ORG_A, "Bed 3", "PO-200")

    after = await service.update(
        "devices/SN-1", DeviceChanges(display_name="Bed 4", model="PO-300", organization=ORG_B), ["model"], ""
    )

    assert (after.display_name, after.model, after.organization) == ("Bed 3", "PO-300", ORG_A)
    assert after.revision == 2
    assert after.etag != before.etag
    assert after.create_time == before.create_time
    assert store.items["SN-1"] == after


async def test_update_star_replaces_every_updatable_field(
    service: DeviceService, directory: FakeOrganizationDirectory
) -> None:
    before = await service.create("SN-1", ORG_A, "Bed 3", "PO-200")

    after = await service.update(
        "devices/SN-1", DeviceChanges(display_name="", model="PO-300", organization=ORG_B), ["*"], before.etag
    )

    assert (after.display_name, after.model, after.organization) == ("", "PO-300", ORG_B)
    assert directory.asked == [ORG_A, ORG_B]


async def test_update_that_keeps_the_organization_does_not_ask_the_directory(
    service: DeviceService, directory: FakeOrganizationDirectory
) -> None:
    await service.create("SN-1", ORG_A, "Bed 3", "PO-200")
    directory.unavailable = True  # would fail if asked

    after = await service.update("devices/SN-1", DeviceChanges("Bed 4", "PO-200", ORG_A), ["*"], "")

    assert after.display_name == "Bed 4"
    assert directory.asked == [ORG_A]


async def test_update_moving_to_an_unknown_organization_is_rejected(
    service: DeviceService, store: InMemoryRepository[Device]
) -> None:
    before = await service.create("SN-1", ORG_A, "Bed 3", "PO-200")

    with pytest.raises(FailedPrecondition) as caught:
        await service.update("devices/SN-1", DeviceChanges(organization="organizations/ghost"), ["organization"], "")

    assert caught.value.reason == "ORGANIZATION_NOT_FOUND"
    assert only_violation(caught.value)[0] == "device.organization"
    assert store.items["SN-1"] == before


async def test_update_moving_while_the_directory_is_unavailable(
    service: DeviceService, store: InMemoryRepository[Device], directory: FakeOrganizationDirectory
) -> None:
    before = await service.create("SN-1", ORG_A, "Bed 3", "PO-200")
    directory.unavailable = True

    with pytest.raises(Unavailable):
        await service.update("devices/SN-1", DeviceChanges(organization=ORG_B), ["organization"], "")

    assert store.items["SN-1"] == before


@pytest.mark.parametrize(("organization", "reason"), [("", "REQUIRED_FIELD"), ("clinic", "INVALID_NAME")])
async def test_update_to_a_malformed_organization_is_invalid(
    service: DeviceService, store: InMemoryRepository[Device], organization: str, reason: str
) -> None:
    before = await service.create("SN-1", ORG_A, "Bed 3", "PO-200")

    with pytest.raises(InvalidArgument) as caught:
        await service.update("devices/SN-1", DeviceChanges(organization=organization), ["organization"], "")

    assert caught.value.reason == reason
    assert only_violation(caught.value)[0] == "device.organization"
    assert store.items["SN-1"] == before


@pytest.mark.parametrize(("mask", "reason"), [([], "EMPTY_UPDATE_MASK"), (["serial"], "FIELD_NOT_UPDATABLE")])
async def test_update_with_a_bad_mask_is_rejected(
    service: DeviceService, store: InMemoryRepository[Device], mask: list[str], reason: str
) -> None:
    before = await service.create("SN-1", ORG_A, "Bed 3", "PO-200")

    with pytest.raises(InvalidArgument) as caught:
        await service.update("devices/SN-1", DeviceChanges(model="PO-300"), mask, "")

    assert caught.value.reason == reason
    assert only_violation(caught.value)[0] == "update_mask"
    assert store.items["SN-1"] == before


async def test_update_with_a_stale_etag_is_aborted(service: DeviceService, store: InMemoryRepository[Device]) -> None:
    created = await service.create("SN-1", ORG_A, "Bed 3", "PO-200")
    updated = await service.update("devices/SN-1", DeviceChanges(model="PO-300"), ["model"], created.etag)

    with pytest.raises(Aborted) as caught:
        await service.update("devices/SN-1", DeviceChanges(model="PO-400"), ["model"], created.etag)

    assert caught.value.reason == "ETAG_MISMATCH"
    assert caught.value.metadata == {"resource": "SN-1"}
    assert store.items["SN-1"] == updated


async def test_update_that_loses_a_race_is_aborted(directory: FakeOrganizationDirectory) -> None:
    store = RacingRepository("device")
    store.put(a_device("SN-1"))

    with pytest.raises(Aborted):
        await DeviceService(store, directory, RecordingAuditTrail()).update(
            "devices/SN-1", DeviceChanges(model="mine"), ["model"], ""
        )

    assert store.items["SN-1"].model == "written meanwhile"


async def test_update_of_unknown_is_not_found(service: DeviceService) -> None:
    with pytest.raises(NotFound) as caught:
        await service.update("devices/SN-404", DeviceChanges(model="x"), ["model"], "")
    assert caught.value.reason == "DEVICE_NOT_FOUND"


# --- delete ---------------------------------------------------------------------------------------


async def test_delete_with_the_right_etag(service: DeviceService, store: InMemoryRepository[Device]) -> None:
    created = await service.create("SN-1", ORG_A, "", "")

    await service.delete("devices/SN-1", created.etag)

    assert store.items == {}


async def test_delete_with_a_wrong_etag_is_aborted(service: DeviceService, store: InMemoryRepository[Device]) -> None:
    created = await service.create("SN-1", ORG_A, "", "")
    await service.update("devices/SN-1", DeviceChanges(model="PO-300"), ["model"], "")

    with pytest.raises(Aborted) as caught:
        await service.delete("devices/SN-1", created.etag)

    assert caught.value.reason == "ETAG_MISMATCH"
    assert store.items["SN-1"].model == "PO-300"


async def test_delete_that_loses_a_race_is_aborted(directory: FakeOrganizationDirectory) -> None:
    store = RacingRepository("device")
    store.put(a_device("SN-1"))

    with pytest.raises(Aborted):
        await DeviceService(store, directory, RecordingAuditTrail()).delete("devices/SN-1", "")

    assert "SN-1" in store.items


async def test_delete_of_unknown_is_not_found(service: DeviceService) -> None:
    with pytest.raises(NotFound) as caught:
        await service.delete("devices/SN-404", "")
    assert caught.value.reason == "DEVICE_NOT_FOUND"


# --- audit ----------------------------------------------------------------------------------------


def admin_actor() -> AuditActor:
    return AuditActor(PLATFORM_ADMIN.subject, PLATFORM_ADMIN.organization, "platform_admin")


async def test_each_mutation_records_one_event_about_the_device_and_its_owner(
    service: DeviceService, trail: RecordingAuditTrail
) -> None:
    method = "/medmesh.device.v1.DeviceService/CreateDevice"
    with acting_as(PLATFORM_ADMIN, method, "203.0.113.9"):
        created = await service.create("SN-1", ORG_A, "Bed 3", "PO-200")
    assert len(trail.events) == 1
    event = trail.events[0]
    assert (event.organization, event.resource, event.actor) == (ORG_A, "devices/SN-1", admin_actor())
    assert (event.method, event.source_ip, event.service) == (method.lstrip("/"), "203.0.113.9", "device")
    assert (event.phi_fields_read, event.phi_fields_changed) == ((), ())  # a device holds no PHI

    await service.update("devices/SN-1", DeviceChanges(model="PO-300"), ["model"], created.etag)
    assert len(trail.events) == 2
    assert (trail.events[1].organization, trail.events[1].resource) == (ORG_A, "devices/SN-1")
    assert (trail.events[1].description, trail.events[1].actor) == ("changed model", admin_actor())

    await service.delete("devices/SN-1", "")
    assert len(trail.events) == 3
    assert (trail.events[2].organization, trail.events[2].resource) == (ORG_A, "devices/SN-1")
    assert trail.events[2].actor == admin_actor()
    assert len({e.id for e in trail.events}) == 3


async def test_a_move_is_recorded_once_under_the_new_owner(service: DeviceService, trail: RecordingAuditTrail) -> None:
    await service.create("SN-1", ORG_A, "Bed 3", "PO-200")
    trail.events.clear()

    await service.update("devices/SN-1", DeviceChanges(organization=ORG_B, model="PO-300"), ["*"], "")

    assert [(e.organization, e.resource) for e in trail.events] == [(ORG_B, "devices/SN-1")]
    assert trail.events[0].description == "changed display_name, model, organization"


async def test_reads_record_nothing(
    service: DeviceService, store: InMemoryRepository[Device], trail: RecordingAuditTrail
) -> None:
    for i in range(5):
        store.put(a_device(f"SN-{i}"))

    await service.get("devices/SN-1")
    await all_pages(service, "", 2)
    await service.list_devices('model = "PO-200"', 10, "")
    with pytest.raises(NotFound):
        await service.get("devices/SN-404")

    assert trail.events == []


async def test_mutations_that_fail_record_nothing(
    service: DeviceService, directory: FakeOrganizationDirectory, trail: RecordingAuditTrail
) -> None:
    created = await service.create("SN-1", ORG_A, "Bed 3", "PO-200")
    await service.update("devices/SN-1", DeviceChanges(model="PO-300"), ["model"], "")
    trail.events.clear()

    with pytest.raises(AlreadyExists):
        await service.create("SN-1", ORG_A, "", "")
    with pytest.raises(FailedPrecondition):
        await service.create("SN-2", "organizations/ghost", "", "")
    with pytest.raises(Aborted):
        await service.update("devices/SN-1", DeviceChanges(model="stale"), ["model"], created.etag)
    with pytest.raises(FailedPrecondition):
        await service.update("devices/SN-1", DeviceChanges(organization="organizations/ghost"), ["organization"], "")
    with pytest.raises(NotFound):
        await service.update("devices/SN-404", DeviceChanges(model="x"), ["model"], "")
    with pytest.raises(Aborted):
        await service.delete("devices/SN-1", created.etag)
    with pytest.raises(NotFound):
        await service.delete("devices/SN-404", "")
    directory.unavailable = True
    with pytest.raises(Unavailable):
        await service.create("SN-3", ORG_A, "", "")

    assert trail.events == []


# --- servicer: protobuf <-> domain ----------------------------------------------------------------


async def test_servicer_create_update_and_list(service: DeviceService) -> None:
    servicer = DeviceServicer(service)
    created = await servicer.CreateDevice(
        pb.CreateDeviceRequest(
            device_id="SN-1", device=pb.Device(organization=ORG_A, display_name="Bed 3", model="PO-200")
        ),
        None,
    )
    updated = await servicer.UpdateDevice(
        pb.UpdateDeviceRequest(
            device=pb.Device(name="devices/SN-1", organization=ORG_B, model="ignored", etag=created.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["organization"]),
        ),
        None,
    )
    listed = await servicer.ListDevices(pb.ListDevicesRequest(filter='organization = "organizations/b"'), None)

    assert (created.name, created.organization, created.model) == ("devices/SN-1", ORG_A, "PO-200")
    assert (updated.organization, updated.model, updated.display_name) == (ORG_B, "PO-200", "Bed 3")
    assert updated.etag != created.etag
    assert [d.name for d in listed.devices] == ["devices/SN-1"]
    assert listed.next_page_token == ""


# --- the real directory, over gRPC to an in-process organization service --------------------------
#
# The organization service authorizes every call, so the server here verifies access tokens, and
# the directory's channel is a mesh channel (`peer_channel`), which forwards the bearer token of
# the call being served: the organization service answers for the device service's caller.

KEY_ID = "unit-test-key"
SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())


class StaticKeys:
    """The identity service's published keys, as the verifier sees them."""

    async def public_key(self, kid: str) -> Any | None:
        return SIGNING_KEY.public_key() if kid == KEY_ID else None


def with_token(principal: Principal) -> Principal:
    """`principal` carrying a signed access token for it, as the request interceptor would set it."""
    issued = int(time.time())
    claims = {
        "sub": principal.subject,
        "org": principal.organization,
        "role": str(principal.role),
        "iss": "medmesh",
        "aud": "medmesh",
        "iat": issued,
        "exp": issued + 300,
    }
    token = jwt.encode(claims, SIGNING_KEY, algorithm="ES256", headers={"kid": KEY_ID})
    return replace(principal, token=token)


OPERATOR_A = Principal("organizations/a/users/op", ORG_A, Role.OPERATOR)


@pytest.fixture
async def organization_server() -> AsyncIterator[tuple[str, InMemoryRepository[Organization]]]:
    store: InMemoryRepository[Organization] = InMemoryRepository("organization")
    store.put(Organization("a", "Clinic A", OrganizationKind.CARE_PROVIDER, now(), now()))
    authenticator = Authenticator(TokenVerifier(StaticKeys()))
    server = grpc.aio.server(interceptors=[RequestInterceptor("organization.medmesh", authenticator)])
    organization_pb_grpc.add_OrganizationServiceServicer_to_server(  # type: ignore[no-untyped-call]
        OrganizationServicer(OrganizationService(store, RecordingAuditTrail(), "manufacturer")), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", store
    finally:
        await server.stop(grace=None)


async def test_grpc_directory_tells_existing_from_missing(
    organization_server: tuple[str, InMemoryRepository[Organization]],
) -> None:
    address, _ = organization_server

    async with peer_channel("organization", address, caller="device") as channel:
        directory = GrpcOrganizationDirectory(channel)
        with acting_as(with_token(PLATFORM_ADMIN)):
            assert await directory.exists(ORG_A) is True
            assert await directory.exists("organizations/ghost") is False


async def test_grpc_directory_asks_with_the_callers_credentials(
    organization_server: tuple[str, InMemoryRepository[Organization]],
) -> None:
    address, _ = organization_server

    async with peer_channel("organization", address, caller="device") as channel:
        directory = GrpcOrganizationDirectory(channel)
        with acting_as(with_token(OPERATOR_A)):
            assert await directory.exists(ORG_A) is True
        # Refused for want of credentials: that must not read as "the organization does not exist".
        with acting_as(PLATFORM_ADMIN), pytest.raises(Unavailable) as caught:
            await directory.exists(ORG_A)

    assert caught.value.reason == "ORGANIZATION_SERVICE_UNAVAILABLE"
    assert "UNAUTHENTICATED" in caught.value.message


async def test_an_operator_registers_a_device_through_the_real_directory(
    organization_server: tuple[str, InMemoryRepository[Organization]], store: InMemoryRepository[Device]
) -> None:
    address, organizations = organization_server
    trail = RecordingAuditTrail("device")

    async with peer_channel("organization", address, caller="device") as channel:
        service = DeviceService(store, GrpcOrganizationDirectory(channel), trail)
        with acting_as(with_token(OPERATOR_A)):
            created = await service.create("SN-1", ORG_A, "Bed 3", "PO-200")
            del organizations.items["a"]  # the operator's organization is deleted meanwhile
            with pytest.raises(FailedPrecondition) as caught:
                await service.create("SN-2", ORG_A, "", "")

    assert caught.value.reason == "ORGANIZATION_NOT_FOUND"
    assert store.items == {"SN-1": created}
    assert [(e.resource, e.actor.subject) for e in trail.events] == [("devices/SN-1", OPERATOR_A.subject)]


async def test_grpc_directory_that_cannot_reach_the_service_is_unavailable() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await server.stop(grace=None)  # the port is now closed

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(Unavailable) as caught:
            await GrpcOrganizationDirectory(channel, timeout=2.0).exists(ORG_A)

    assert caught.value.reason == "ORGANIZATION_SERVICE_UNAVAILABLE"
    assert "UNAVAILABLE" in caught.value.message
