"""Who may do what with organizations: each role against its own and another organization, list
scoping, PERMISSION_DENIED before NOT_FOUND, and the audit event each permitted change records.

Platform admins belong to the manufacturer organization, everyone else to clinic-a; "own" is the
caller's organization, "other" is clinic-b.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import pytest

from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Role, acting_as, internal_principal
from medmesh.runtime.errors import DomainError, InvalidArgument, NotFound, Unauthenticated
from medmesh.runtime.resources import now
from services.organization.domain import Organization, OrganizationChanges, OrganizationKind
from services.organization.service import OrganizationService
from tests.unit.access import ACCESS, ALLOWED, HOME, MANUFACTURER, OTHER, ROLE, actor_of, matrix_params, member
from tests.unit.fakes import InMemoryRepository

MANUFACTURER_ID = "manufacturer"
GHOST = "organizations/ghost"

ROLES = list(Role)


def a_care_provider(organization_id: str) -> Organization:
    at = now()
    return Organization(organization_id, f"Clinic {organization_id}", OrganizationKind.CARE_PROVIDER, at, at)


@pytest.fixture
def store() -> InMemoryRepository[Organization]:
    return InMemoryRepository("organization")


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("organization")


@pytest.fixture
async def service(store: InMemoryRepository[Organization], trail: RecordingAuditTrail) -> OrganizationService:
    service = OrganizationService(store, trail, MANUFACTURER_ID)
    await service.ensure_manufacturer("Acme Devices")
    store.put(a_care_provider("clinic-a"))
    store.put(a_care_provider("clinic-b"))
    return service


# --- the matrix: role x (own / other organization) for every method on a named organization ---------

Action = Callable[[OrganizationService, str, InMemoryRepository[Organization]], Awaitable[Organization | None]]


async def _get(service: OrganizationService, name: str, store: InMemoryRepository[Organization]) -> Organization:
    return await service.get(name)


async def _rename(service: OrganizationService, name: str, store: InMemoryRepository[Organization]) -> Organization:
    return await service.update(name, OrganizationChanges("Renamed"), ["display_name"], "")


async def _set_kind(service: OrganizationService, name: str, store: InMemoryRepository[Organization]) -> Organization:
    # The kind it already has: the only kind change the one-manufacturer rule lets through.
    current = store.items[name.removeprefix("organizations/")]
    return await service.update(name, OrganizationChanges("ignored", current.kind), ["kind"], "")


async def _delete(service: OrganizationService, name: str, store: InMemoryRepository[Organization]) -> None:
    await service.delete(name, "")


ACTIONS: dict[str, Action] = {"get": _get, "rename": _rename, "set_kind": _set_kind, "delete": _delete}
MUTATIONS = {"rename", "set_kind", "delete"}

# method -> role -> (on the caller's own organization, on another organization)
MATRIX: dict[str, dict[Role, tuple[str, str]]] = {
    "get": {
        Role.PLATFORM_ADMIN: (ALLOWED, ALLOWED),
        Role.ORGANIZATION_ADMIN: (ALLOWED, ACCESS),
        Role.CLINICIAN: (ALLOWED, ACCESS),
        Role.OPERATOR: (ALLOWED, ACCESS),
        Role.PATIENT: (ALLOWED, ACCESS),
    },
    "rename": {
        Role.PLATFORM_ADMIN: (ALLOWED, ALLOWED),
        Role.ORGANIZATION_ADMIN: (ALLOWED, ACCESS),
        Role.CLINICIAN: (ROLE, ROLE),
        Role.OPERATOR: (ROLE, ROLE),
        Role.PATIENT: (ROLE, ROLE),
    },
    "set_kind": {
        Role.PLATFORM_ADMIN: (ALLOWED, ALLOWED),
        Role.ORGANIZATION_ADMIN: (ROLE, ACCESS),
        Role.CLINICIAN: (ROLE, ROLE),
        Role.OPERATOR: (ROLE, ROLE),
        Role.PATIENT: (ROLE, ROLE),
    },
    "delete": {
        # A platform admin's own organization is the manufacturer, which nobody deletes.
        Role.PLATFORM_ADMIN: ("MANUFACTURER_ORGANIZATION", ALLOWED),
        Role.ORGANIZATION_ADMIN: (ROLE, ROLE),
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
    service: OrganizationService,
    store: InMemoryRepository[Organization],
    trail: RecordingAuditTrail,
    method: str,
    role: Role,
    whose: str,
    expected: str,
) -> None:
    caller = member(role)
    target = caller.organization if whose == "own" else OTHER
    before = dict(store.items)

    with acting_as(caller):
        if expected != ALLOWED:
            with pytest.raises(DomainError) as caught:
                await ACTIONS[method](service, target, store)
            assert caught.value.reason == expected
            expected_code = "FAILED_PRECONDITION" if expected == "MANUFACTURER_ORGANIZATION" else "PERMISSION_DENIED"
            assert caught.value.code == expected_code
            assert store.items == before
            assert trail.events == []
            return
        result = await ACTIONS[method](service, target, store)

    if method == "delete":
        assert target.removeprefix("organizations/") not in store.items
    else:
        assert result is not None
        assert result.name == target
    if method in MUTATIONS:
        assert store.items != before
        assert len(trail.events) == 1
        event = trail.events[0]
        assert (event.organization, event.resource, event.actor) == (target, target, actor_of(caller))
    else:
        assert store.items == before
        assert trail.events == []


@pytest.mark.parametrize("role", ROLES, ids=[r.value for r in ROLES])
async def test_only_platform_admins_create_organizations(
    service: OrganizationService, store: InMemoryRepository[Organization], trail: RecordingAuditTrail, role: Role
) -> None:
    caller = member(role)
    before = dict(store.items)

    with acting_as(caller):
        if role is not Role.PLATFORM_ADMIN:
            # Refused for the role before anything about the request is looked at.
            for kind in (None, OrganizationKind.CARE_PROVIDER, OrganizationKind.MANUFACTURER):
                with pytest.raises(DomainError) as caught:
                    await service.create("Clinic C", kind, "clinic-c")
                assert (caught.value.code, caught.value.reason) == ("PERMISSION_DENIED", ROLE)
            assert store.items == before
            assert trail.events == []
            return
        created = await service.create("Clinic C", None, "clinic-c")

    assert store.items["clinic-c"] == created
    assert len(trail.events) == 1
    event = trail.events[0]
    assert (event.organization, event.resource, event.actor) == (created.name, created.name, actor_of(caller))


async def test_an_organization_admin_changes_the_kind_of_nothing_even_with_a_star_mask(
    service: OrganizationService, store: InMemoryRepository[Organization], trail: RecordingAuditTrail
) -> None:
    before = dict(store.items)

    with acting_as(member(Role.ORGANIZATION_ADMIN)), pytest.raises(DomainError) as caught:
        await service.update(HOME, OrganizationChanges("Renamed", OrganizationKind.CARE_PROVIDER), ["*"], "")

    assert (caught.value.code, caught.value.reason) == ("PERMISSION_DENIED", ROLE)
    assert store.items == before
    assert trail.events == []


async def test_the_manufacturers_own_organization_admin_may_rename_it(
    service: OrganizationService, trail: RecordingAuditTrail
) -> None:
    caller = member(Role.ORGANIZATION_ADMIN, MANUFACTURER)

    with acting_as(caller):
        renamed = await service.update(MANUFACTURER, OrganizationChanges("Acme Medical"), ["display_name"], "")
        with pytest.raises(DomainError) as caught:
            await service.delete(MANUFACTURER, "")

    assert (renamed.display_name, renamed.kind) == ("Acme Medical", OrganizationKind.MANUFACTURER)
    assert caught.value.reason == ROLE
    assert [(e.resource, e.actor) for e in trail.events] == [(MANUFACTURER, actor_of(caller))]


async def test_internal_callers_see_every_organization(service: OrganizationService) -> None:
    # The device service asks whether an owner exists with the mesh credential.
    with acting_as(internal_principal("device")):
        other = await service.get(OTHER)
        page = await service.list_organizations("", 10, "")
        with pytest.raises(NotFound):
            await service.get(GHOST)

    assert other.name == OTHER
    assert [o.name for o in page.organizations] == [HOME, OTHER, MANUFACTURER]


# --- PERMISSION_DENIED before NOT_FOUND -------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES, ids=[r.value for r in ROLES])
async def test_a_missing_organization_elsewhere_is_permission_denied_not_not_found(
    service: OrganizationService, store: InMemoryRepository[Organization], trail: RecordingAuditTrail, role: Role
) -> None:
    caller = member(role)
    # What each method says about another, existing organization is what it says about a missing one.
    expected = {
        "get": MATRIX["get"][role][1],
        "rename": MATRIX["rename"][role][1],
        "delete": MATRIX["delete"][role][1],
    }

    with acting_as(caller):
        for method, reason in expected.items():
            if reason == ALLOWED:  # platform admins may know it does not exist
                with pytest.raises(NotFound) as not_found:
                    await ACTIONS[method](service, GHOST, store)
                assert not_found.value.reason == "ORGANIZATION_NOT_FOUND"
                continue
            with pytest.raises(DomainError) as caught:
                await ACTIONS[method](service, GHOST, store)
            assert (method, caught.value.code, caught.value.reason) == (method, "PERMISSION_DENIED", reason)

    assert trail.events == []


async def test_a_member_whose_organization_is_gone_is_told_it_does_not_exist(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    del store.items["clinic-a"]

    with acting_as(member(Role.ORGANIZATION_ADMIN)):
        with pytest.raises(NotFound) as caught:
            await service.get(HOME)
        page = await service.list_organizations("", 10, "")

    assert caught.value.reason == "ORGANIZATION_NOT_FOUND"
    assert (page.organizations, page.next_page_token) == ([], "")


# --- list scoping -----------------------------------------------------------------------------------


async def test_platform_admins_list_every_organization_page_by_page(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    for i in range(4):
        store.put(a_care_provider(f"clinic-x{i}"))

    pages: list[list[str]] = []
    token = ""
    with acting_as(member(Role.PLATFORM_ADMIN)):
        while True:
            page = await service.list_organizations("", 2, token)
            pages.append([o.id for o in page.organizations])
            token = page.next_page_token
            if not token:
                break

    assert pages == [
        ["clinic-a", "clinic-b"],
        ["clinic-x0", "clinic-x1"],
        ["clinic-x2", "clinic-x3"],
        [MANUFACTURER_ID],
    ]


@pytest.mark.parametrize("role", [r for r in ROLES if r is not Role.PLATFORM_ADMIN], ids=lambda r: r.value)
async def test_everyone_else_lists_only_their_own_organization(
    service: OrganizationService, trail: RecordingAuditTrail, role: Role
) -> None:
    with acting_as(member(role)):
        everything = await service.list_organizations("", 1, "")
        matching = await service.list_organizations(
            'kind = KIND_CARE_PROVIDER AND display_name = "Clinic clinic-a"', 10, ""
        )
        other_kind = await service.list_organizations("kind = KIND_MANUFACTURER", 10, "")
        other_name = await service.list_organizations('display_name = "Clinic clinic-b"', 10, "")

    assert ([o.name for o in everything.organizations], everything.next_page_token) == ([HOME], "")
    assert [o.name for o in matching.organizations] == [HOME]
    assert other_kind.organizations == []
    assert other_name.organizations == []
    assert trail.events == []


async def test_a_manufacturer_member_who_is_not_a_platform_admin_lists_only_the_manufacturer(
    service: OrganizationService,
) -> None:
    with acting_as(member(Role.OPERATOR, MANUFACTURER)):
        page = await service.list_organizations("", 10, "")

    assert [o.name for o in page.organizations] == [MANUFACTURER]


async def test_a_scoped_list_still_rejects_a_bad_filter(service: OrganizationService) -> None:
    with acting_as(member(Role.CLINICIAN)), pytest.raises(InvalidArgument) as caught:
        await service.list_organizations('colour = "red"', 10, "")

    assert caught.value.reason == "INVALID_FILTER"


# --- no credentials ---------------------------------------------------------------------------------


@pytest.mark.parametrize("inside_a_call", [True, False], ids=["call-without-principal", "outside-any-call"])
async def test_every_method_needs_a_caller(
    service: OrganizationService,
    store: InMemoryRepository[Organization],
    trail: RecordingAuditTrail,
    inside_a_call: bool,
) -> None:
    before = dict(store.items)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: service.create("Clinic C", None, "clinic-c"),
        lambda: service.get(HOME),
        lambda: service.list_organizations("", 10, ""),
        lambda: service.update(HOME, OrganizationChanges("Renamed"), ["display_name"], ""),
        lambda: service.delete(OTHER, ""),
    ]

    for call in calls:
        without_principal = acting_as(None) if inside_a_call else contextlib.nullcontext()
        with without_principal, pytest.raises(Unauthenticated) as caught:
            await call()
        assert caught.value.reason == "CREDENTIALS_MISSING"

    assert store.items == before
    assert trail.events == []
