"""Who may do what with devices: each role against its own and another organization's devices,
PERMISSION_DENIED before NOT_FOUND, list scoping across pages, and the audit event each permitted
change records.

Platform admins belong to the manufacturer organization, everyone else to clinic-a; "own" is a
device of the caller's organization, "other" one of clinic-b.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import pytest

from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Role, acting_as, internal_principal
from medmesh.runtime.errors import DomainError, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from medmesh.runtime.resources import now
from services.device.domain import Device, DeviceChanges
from services.device.service import DeviceService
from tests.unit.access import ACCESS, ALLOWED, HOME, MANUFACTURER, OTHER, ROLE, actor_of, matrix_params, member
from tests.unit.fakes import FakeOrganizationDirectory, InMemoryRepository

ROLES = list(Role)
NON_ADMINS = [r for r in ROLES if r is not Role.PLATFORM_ADMIN]

# The device each organization owns in the seeded store.
DEVICE_OF = {MANUFACTURER: "SN-M", HOME: "SN-A", OTHER: "SN-B"}


def a_device(serial: str, organization: str, model: str = "PO-200") -> Device:
    at = now()
    return Device(serial, organization, f"Bed {serial}", model, at, at)


@pytest.fixture
def store() -> InMemoryRepository[Device]:
    store: InMemoryRepository[Device] = InMemoryRepository("device")
    for organization, serial in DEVICE_OF.items():
        store.put(a_device(serial, organization))
    return store


@pytest.fixture
def directory() -> FakeOrganizationDirectory:
    return FakeOrganizationDirectory({MANUFACTURER, HOME, OTHER})


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("device")


@pytest.fixture
def service(
    store: InMemoryRepository[Device], directory: FakeOrganizationDirectory, trail: RecordingAuditTrail
) -> DeviceService:
    return DeviceService(store, directory, trail)


def elsewhere(organization: str) -> str:
    """Where a move takes a device of `organization`: always another organization."""
    return HOME if organization == OTHER else OTHER


# --- the matrix: role x (own / other organization's device) for every method ------------------------

Action = Callable[[DeviceService, str], Awaitable[Device | None]]


async def _get(service: DeviceService, organization: str) -> Device:
    return await service.get(f"devices/{DEVICE_OF[organization]}")


async def _update(service: DeviceService, organization: str) -> Device:
    return await service.update(f"devices/{DEVICE_OF[organization]}", DeviceChanges(model="PO-300"), ["model"], "")


async def _move(service: DeviceService, organization: str) -> Device:
    changes = DeviceChanges(organization=elsewhere(organization))
    return await service.update(f"devices/{DEVICE_OF[organization]}", changes, ["organization"], "")


async def _delete(service: DeviceService, organization: str) -> None:
    await service.delete(f"devices/{DEVICE_OF[organization]}", "")


async def _create(service: DeviceService, organization: str) -> Device:
    return await service.create("SN-NEW", organization, "New", "PO-200")


ACTIONS: dict[str, Action] = {"create": _create, "get": _get, "update": _update, "move": _move, "delete": _delete}
MUTATIONS = {"create", "update", "move", "delete"}

# method -> role -> (on the caller's own organization, on another organization)
MATRIX: dict[str, dict[Role, tuple[str, str]]] = {
    "create": {
        Role.PLATFORM_ADMIN: (ALLOWED, ALLOWED),
        Role.ORGANIZATION_ADMIN: (ALLOWED, ACCESS),
        Role.CLINICIAN: (ROLE, ROLE),
        Role.OPERATOR: (ALLOWED, ACCESS),
        Role.PATIENT: (ROLE, ROLE),
    },
    "get": {
        Role.PLATFORM_ADMIN: (ALLOWED, ALLOWED),
        Role.ORGANIZATION_ADMIN: (ALLOWED, ACCESS),
        Role.CLINICIAN: (ALLOWED, ACCESS),
        Role.OPERATOR: (ALLOWED, ACCESS),
        Role.PATIENT: (ROLE, ROLE),
    },
    "update": {
        Role.PLATFORM_ADMIN: (ALLOWED, ALLOWED),
        Role.ORGANIZATION_ADMIN: (ALLOWED, ACCESS),
        Role.CLINICIAN: (ROLE, ROLE),
        Role.OPERATOR: (ALLOWED, ACCESS),
        Role.PATIENT: (ROLE, ROLE),
    },
    "move": {
        Role.PLATFORM_ADMIN: (ALLOWED, ALLOWED),
        Role.ORGANIZATION_ADMIN: (ROLE, ACCESS),
        Role.CLINICIAN: (ROLE, ROLE),
        Role.OPERATOR: (ROLE, ACCESS),
        Role.PATIENT: (ROLE, ROLE),
    },
    "delete": {
        Role.PLATFORM_ADMIN: (ALLOWED, ALLOWED),
        Role.ORGANIZATION_ADMIN: (ALLOWED, ACCESS),
        Role.CLINICIAN: (ROLE, ROLE),
        Role.OPERATOR: (ROLE, ROLE),
        Role.PATIENT: (ROLE, ROLE),
    },
}


def test_the_matrix_covers_every_method_and_role() -> None:
    assert set(MATRIX) == set(ACTIONS)
    assert all(set(row) == set(Role) for row in MATRIX.values())


@pytest.mark.parametrize(
    ("method", "role", "whose", "expected"),
    matrix_params(MATRIX),
)
async def test_access_matrix(
    service: DeviceService,
    store: InMemoryRepository[Device],
    directory: FakeOrganizationDirectory,
    trail: RecordingAuditTrail,
    method: str,
    role: Role,
    whose: str,
    expected: str,
) -> None:
    caller = member(role)
    organization = caller.organization if whose == "own" else OTHER
    before = dict(store.items)

    with acting_as(caller):
        if expected != ALLOWED:
            with pytest.raises(PermissionDenied) as caught:
                await ACTIONS[method](service, organization)
            assert caught.value.reason == expected
            assert store.items == before
            assert directory.asked == []  # refused before asking anyone about the organization
            assert trail.events == []
            return
        result = await ACTIONS[method](service, organization)

    serial = "SN-NEW" if method == "create" else DEVICE_OF[organization]
    if method == "delete":
        assert serial not in store.items
    else:
        assert result is not None
        assert store.items[serial] == result
    owner = elsewhere(organization) if method == "move" else organization
    if method in MUTATIONS:
        assert store.items != before
        assert len(trail.events) == 1
        event = trail.events[0]
        assert (event.organization, event.resource, event.actor) == (owner, f"devices/{serial}", actor_of(caller))
    else:
        assert store.items == before
        assert trail.events == []


@pytest.mark.parametrize("role", ROLES, ids=[r.value for r in ROLES])
async def test_list_is_refused_only_to_roles_that_do_not_read_devices(
    service: DeviceService, trail: RecordingAuditTrail, role: Role
) -> None:
    caller = member(role)

    with acting_as(caller):
        if role is Role.PATIENT:
            with pytest.raises(PermissionDenied) as caught:
                await service.list_devices("", 10, "")
            assert caught.value.reason == ROLE
            return
        page = await service.list_devices("", 10, "")

    expected = ["SN-A", "SN-B", "SN-M"] if role is Role.PLATFORM_ADMIN else ["SN-A"]
    assert [d.id for d in page.devices] == expected
    assert trail.events == []


async def test_registering_for_a_missing_organization_elsewhere_is_permission_denied(
    service: DeviceService, directory: FakeOrganizationDirectory, store: InMemoryRepository[Device]
) -> None:
    with acting_as(member(Role.OPERATOR)), pytest.raises(PermissionDenied) as caught:
        await service.create("SN-NEW", "organizations/ghost", "", "")

    assert caught.value.reason == ACCESS
    assert directory.asked == []
    assert "SN-NEW" not in store.items


async def test_an_operator_may_rewrite_the_organization_it_already_has(
    service: DeviceService, trail: RecordingAuditTrail
) -> None:
    # "organization" in the mask is a move only if the value changes.
    with acting_as(member(Role.OPERATOR)):
        after = await service.update("devices/SN-A", DeviceChanges("Bed 9", "PO-300", HOME), ["*"], "")

    assert (after.organization, after.display_name, after.model) == (HOME, "Bed 9", "PO-300")
    assert [(e.organization, e.resource) for e in trail.events] == [(HOME, "devices/SN-A")]


# --- PERMISSION_DENIED before NOT_FOUND --------------------------------------------------------------


MISSING_ACTIONS: dict[str, Callable[[DeviceService], Awaitable[object]]] = {
    "get": lambda service: service.get("devices/SN-404"),
    "update": lambda service: service.update("devices/SN-404", DeviceChanges(model="x"), ["model"], ""),
    "move": lambda service: service.update("devices/SN-404", DeviceChanges(organization=OTHER), ["organization"], ""),
    "delete": lambda service: service.delete("devices/SN-404", ""),
}


@pytest.mark.parametrize("role", ROLES, ids=[r.value for r in ROLES])
@pytest.mark.parametrize("method", list(MISSING_ACTIONS))
async def test_a_missing_device_is_what_another_organizations_device_is(
    service: DeviceService, trail: RecordingAuditTrail, method: str, role: Role
) -> None:
    """Device names carry no organization: only platform admins may learn that a serial is unused."""
    expected = MATRIX[method][role][1]

    with acting_as(member(role)):
        if expected == ALLOWED:
            with pytest.raises(NotFound) as not_found:
                await MISSING_ACTIONS[method](service)
            assert not_found.value.reason == "DEVICE_NOT_FOUND"
            assert not_found.value.metadata == {"device": "devices/SN-404"}
            return
        with pytest.raises(PermissionDenied) as missing:
            await MISSING_ACTIONS[method](service)

    assert missing.value.reason == expected
    assert trail.events == []


@pytest.mark.parametrize("role", [Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR], ids=lambda r: r.value)
async def test_the_refusal_does_not_tell_a_missing_device_from_a_foreign_one(
    service: DeviceService, role: Role
) -> None:
    with acting_as(member(role)):
        with pytest.raises(PermissionDenied) as foreign:
            await service.get("devices/SN-B")
        with pytest.raises(PermissionDenied) as missing:
            await service.get("devices/SN-404")

    def shape(error: DomainError, serial: str) -> tuple[str, str, str, dict[str, str]]:
        masked = {key: value.replace(serial, "*") for key, value in error.metadata.items()}
        return error.code, error.reason, error.message.replace(serial, "*"), masked

    assert shape(foreign.value, "SN-B") == shape(missing.value, "SN-404")
    assert foreign.value.field_violations == missing.value.field_violations == ()


async def test_internal_callers_are_told_not_found(service: DeviceService) -> None:
    with acting_as(internal_principal("command")):
        foreign = await service.get("devices/SN-B")
        with pytest.raises(NotFound):
            await service.get("devices/SN-404")

    assert foreign.organization == OTHER


async def test_registering_a_serial_that_another_organization_owns_does_not_reveal_it(
    service: DeviceService, store: InMemoryRepository[Device]
) -> None:
    with acting_as(member(Role.OPERATOR)), pytest.raises(DomainError) as caught:
        await service.create("SN-B", HOME, "", "")

    assert store.items["SN-B"].organization == OTHER
    assert (caught.value.code, caught.value.reason) == ("PERMISSION_DENIED", ACCESS)


# --- list scoping -----------------------------------------------------------------------------------


@pytest.fixture
def many(store: InMemoryRepository[Device]) -> InMemoryRepository[Device]:
    """Twelve more devices, home and other interleaved, every third one a PO-300."""
    for i in range(12):
        store.put(a_device(f"SN-{i:02d}", HOME if i % 2 else OTHER, "PO-300" if i % 3 == 0 else "PO-200"))
    return store


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


@pytest.mark.parametrize("role", [Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR], ids=lambda r: r.value)
async def test_a_member_pages_through_exactly_their_organizations_devices(
    service: DeviceService, many: InMemoryRepository[Device], role: Role
) -> None:
    with acting_as(member(role)):
        pages = await all_pages(service, "", 3)

    assert pages == [["SN-01", "SN-03", "SN-05"], ["SN-07", "SN-09", "SN-11"], ["SN-A"]]


async def test_a_scoped_list_combines_the_callers_filter_with_the_scope(
    service: DeviceService, many: InMemoryRepository[Device]
) -> None:
    with acting_as(member(Role.CLINICIAN)):
        po300 = await all_pages(service, 'model = "PO-300"', 1)
        not_po300 = await all_pages(service, 'model != "PO-300"', 2)
        own = await all_pages(service, f'organization = "{HOME}"', 10)
        foreign = await service.list_devices(f'organization = "{OTHER}"', 10, "")
        foreign_excluded = await service.list_devices(f'organization != "{OTHER}"', 10, "")

    assert po300 == [["SN-03"], ["SN-09"]]
    assert not_po300 == [["SN-01", "SN-05"], ["SN-07", "SN-11"], ["SN-A"]]
    assert own == [["SN-01", "SN-03", "SN-05", "SN-07", "SN-09", "SN-11", "SN-A"]]
    assert (foreign.devices, foreign.next_page_token) == ([], "")  # the filter cannot lift the scope
    assert [d.id for d in foreign_excluded.devices] == ["SN-01", "SN-03", "SN-05", "SN-07", "SN-09", "SN-11", "SN-A"]


async def test_platform_admins_page_through_every_organizations_devices(
    service: DeviceService, many: InMemoryRepository[Device]
) -> None:
    with acting_as(member(Role.PLATFORM_ADMIN)):
        pages = await all_pages(service, "", 5)
        foreign = await all_pages(service, f'organization = "{OTHER}"', 4)

    assert [s for page in pages for s in page] == sorted(many.items)
    assert [len(p) for p in pages] == [5, 5, 5]
    assert foreign == [["SN-00", "SN-02", "SN-04", "SN-06"], ["SN-08", "SN-10", "SN-B"]]


async def test_a_page_token_is_bound_to_the_callers_scope(
    service: DeviceService, many: InMemoryRepository[Device]
) -> None:
    with acting_as(member(Role.OPERATOR)):
        first = await service.list_devices("", 2, "")
    assert first.next_page_token

    for other in (member(Role.OPERATOR, OTHER), member(Role.PLATFORM_ADMIN)):
        with acting_as(other), pytest.raises(InvalidArgument) as caught:
            await service.list_devices("", 2, first.next_page_token)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"

    with acting_as(member(Role.CLINICIAN)):  # the same organization: the same scope
        second = await service.list_devices("", 2, first.next_page_token)
    assert [d.id for d in second.devices] == ["SN-05", "SN-07"]


async def test_a_member_of_an_organization_without_devices_lists_nothing(
    service: DeviceService, many: InMemoryRepository[Device]
) -> None:
    with acting_as(member(Role.ORGANIZATION_ADMIN, "organizations/empty")):
        page = await service.list_devices("", 10, "")

    assert (page.devices, page.next_page_token) == ([], "")


# --- no credentials ---------------------------------------------------------------------------------


@pytest.mark.parametrize("inside_a_call", [True, False], ids=["call-without-principal", "outside-any-call"])
async def test_every_method_needs_a_caller(
    service: DeviceService,
    store: InMemoryRepository[Device],
    directory: FakeOrganizationDirectory,
    trail: RecordingAuditTrail,
    inside_a_call: bool,
) -> None:
    before = dict(store.items)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: service.create("SN-NEW", HOME, "", ""),
        lambda: service.get("devices/SN-A"),
        lambda: service.list_devices("", 10, ""),
        lambda: service.update("devices/SN-A", DeviceChanges(model="x"), ["model"], ""),
        lambda: service.delete("devices/SN-A", ""),
    ]

    for call in calls:
        without_principal = acting_as(None) if inside_a_call else contextlib.nullcontext()
        with without_principal, pytest.raises(Unauthenticated) as caught:
            await call()
        assert caught.value.reason == "CREDENTIALS_MISSING"

    assert store.items == before
    assert directory.asked == []
    assert trail.events == []
