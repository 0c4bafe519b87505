"""OrganizationService use cases against an in-memory repository, plus the servicer's translation.

Every test here acts as a platform admin (see `_as_platform_admin`); who may do what is in
test_organization_access.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC

import pytest
from google.protobuf import field_mask_pb2

from medmesh.organization.v1 import organization_service_pb2 as pb
from medmesh.runtime.audit import AuditActor, Outcome, RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as, current_principal
from medmesh.runtime.errors import Aborted, AlreadyExists, DomainError, FailedPrecondition, InvalidArgument, NotFound
from medmesh.runtime.resources import now
from services.organization.domain import ID_PATTERN, Organization, OrganizationChanges, OrganizationKind
from services.organization.service import OrganizationService
from services.organization.servicer import OrganizationServicer
from tests.unit.fakes import InMemoryRepository

MANUFACTURER = OrganizationKind.MANUFACTURER
CARE_PROVIDER = OrganizationKind.CARE_PROVIDER
MANUFACTURER_ID = "manufacturer"
PLATFORM_ADMIN = Principal(
    subject="organizations/manufacturer/users/admin",
    organization="organizations/manufacturer",
    role=Role.PLATFORM_ADMIN,
)


class RacingRepository(InMemoryRepository[Organization]):
    """Another writer bumps the revision right after the service reads: its write must lose."""

    async def get(self, resource_id: str) -> Organization | None:
        current = await super().get(resource_id)
        if current is not None:
            self.put(replace(current, display_name="written meanwhile", revision=current.revision + 1))
        return current


@pytest.fixture(autouse=True)
def _as_platform_admin() -> Iterator[None]:
    # pytest-asyncio runs each test in a copy of the context the fixtures left, so the
    # principal set here is the one the (async) test and the service see.
    with acting_as(PLATFORM_ADMIN):
        yield


@pytest.fixture
def store() -> InMemoryRepository[Organization]:
    return InMemoryRepository("organization")


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("organization")


@pytest.fixture
def service(store: InMemoryRepository[Organization], trail: RecordingAuditTrail) -> OrganizationService:
    return OrganizationService(store, trail, MANUFACTURER_ID)


def an_organization(organization_id: str, kind: OrganizationKind = CARE_PROVIDER) -> Organization:
    at = now()
    return Organization(organization_id, "Acme", kind, at, at)


def only_violation(error: DomainError) -> tuple[str, str]:
    assert len(error.field_violations) == 1, error.field_violations
    violation = error.field_violations[0]
    return violation.field, violation.description


async def seed(service: OrganizationService, ids: list[str], kind: OrganizationKind = CARE_PROVIDER) -> None:
    for organization_id in ids:
        await service.create(f"Org {organization_id}", kind, organization_id)


async def all_pages(service: OrganizationService, filter_text: str, page_size: int) -> list[list[str]]:
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await service.list_organizations(filter_text, page_size, token)
        pages.append([o.id for o in page.organizations])
        token = page.next_page_token
        if not token:
            return pages
        assert len(pages) < 100, "paging does not terminate"


async def test_the_fixture_principal_reaches_the_test() -> None:
    # Everything below relies on it; without it every call would be UNAUTHENTICATED.
    assert current_principal() == PLATFORM_ADMIN


# --- the manufacturer -------------------------------------------------------------------------------


async def test_ensure_manufacturer_creates_the_one_manufacturer(
    service: OrganizationService, store: InMemoryRepository[Organization], trail: RecordingAuditTrail
) -> None:
    with acting_as(None):  # runs at start-up, outside any call
        await service.ensure_manufacturer("Acme Devices")

    manufacturer = store.items[MANUFACTURER_ID]
    assert (manufacturer.name, manufacturer.display_name, manufacturer.kind) == (
        "organizations/manufacturer",
        "Acme Devices",
        MANUFACTURER,
    )
    assert manufacturer.revision == 1
    assert manufacturer.create_time == manufacturer.update_time
    assert list(store.items) == [MANUFACTURER_ID]
    assert trail.events == []


async def test_ensure_manufacturer_is_idempotent(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    await service.ensure_manufacturer("Acme Devices")
    first = store.items[MANUFACTURER_ID]

    await service.ensure_manufacturer("Another name")  # a restart, or another instance

    assert store.items == {MANUFACTURER_ID: first}


async def test_ensure_manufacturer_that_loses_the_race_to_insert_is_quiet() -> None:
    class LateRepository(InMemoryRepository[Organization]):
        """Another instance inserts between this one's get and insert."""

        async def get(self, resource_id: str) -> Organization | None:
            return None

    store = LateRepository("organization")
    theirs = replace(an_organization(MANUFACTURER_ID, MANUFACTURER), display_name="Theirs")
    store.put(theirs)

    await OrganizationService(store, RecordingAuditTrail(), MANUFACTURER_ID).ensure_manufacturer("Mine")

    assert store.items == {MANUFACTURER_ID: theirs}


async def test_create_refuses_a_second_manufacturer(
    service: OrganizationService, store: InMemoryRepository[Organization], trail: RecordingAuditTrail
) -> None:
    await service.ensure_manufacturer("Acme Devices")
    before = dict(store.items)

    with pytest.raises(InvalidArgument) as caught:
        await service.create("Impostor", MANUFACTURER, "impostor")

    assert caught.value.reason == "KIND_NOT_ALLOWED"
    assert only_violation(caught.value)[0] == "organization.kind"
    assert store.items == before
    assert trail.events == []


async def test_the_manufacturer_cannot_be_deleted(
    service: OrganizationService, store: InMemoryRepository[Organization], trail: RecordingAuditTrail
) -> None:
    await service.ensure_manufacturer("Acme Devices")
    manufacturer = store.items[MANUFACTURER_ID]

    for etag in ("", manufacturer.etag):
        with pytest.raises(FailedPrecondition) as caught:
            await service.delete("organizations/manufacturer", etag)
        assert caught.value.reason == "MANUFACTURER_ORGANIZATION"
        assert caught.value.metadata == {"organization": "organizations/manufacturer"}

    assert store.items == {MANUFACTURER_ID: manufacturer}
    assert trail.events == []


# --- create ---------------------------------------------------------------------------------------


async def test_create_assigns_a_server_id_and_defaults_kind(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    created = await service.create("Clinic A", None)

    assert ID_PATTERN.match(created.id)
    assert len(created.id) == 32
    assert created.name == f"organizations/{created.id}"
    assert created.kind is CARE_PROVIDER
    assert created.revision == 1
    assert created.create_time == created.update_time
    assert created.create_time.tzinfo is UTC
    assert created.create_time.microsecond % 1000 == 0  # what BSON keeps
    assert store.items == {created.id: created}


async def test_server_ids_are_unique(service: OrganizationService) -> None:
    first = await service.create("A", None)
    second = await service.create("A", None)
    assert first.id != second.id


async def test_create_with_explicit_id_and_kind(service: OrganizationService) -> None:
    created = await service.create("  Acme Medical  ", CARE_PROVIDER, "acme")

    assert created.id == "acme"
    assert created.name == "organizations/acme"
    assert created.kind is CARE_PROVIDER
    assert created.display_name == "Acme Medical"
    assert await service.get("organizations/acme") == created


@pytest.mark.parametrize("display_name", ["", "   ", "\t\n"])
async def test_create_requires_display_name(
    service: OrganizationService, store: InMemoryRepository[Organization], display_name: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.create(display_name, None, "acme")

    assert caught.value.reason == "REQUIRED_FIELD"
    assert only_violation(caught.value) == ("organization.display_name", "is required")
    assert store.items == {}


async def test_create_rejects_a_too_long_display_name(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.create("x" * 201, None, "acme")

    field, description = only_violation(caught.value)
    assert field == "organization.display_name"
    assert "200" in description
    assert store.items == {}


async def test_create_accepts_exactly_the_maximum_display_name(service: OrganizationService) -> None:
    created = await service.create("x" * 200, None, "acme")
    assert created.display_name == "x" * 200


async def test_duplicate_create_is_already_exists(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    original = await service.create("Acme", CARE_PROVIDER, "acme")

    with pytest.raises(AlreadyExists) as caught:
        await service.create("Impostor", None, "acme")

    assert caught.value.reason == "ORGANIZATION_ALREADY_EXISTS"
    assert caught.value.metadata == {"organization": "acme"}
    assert store.items == {"acme": original}


# --- get ------------------------------------------------------------------------------------------


async def test_get_unknown_is_not_found(service: OrganizationService) -> None:
    with pytest.raises(NotFound) as caught:
        await service.get("organizations/nobody")

    assert caught.value.reason == "ORGANIZATION_NOT_FOUND"
    assert caught.value.metadata == {"organization": "organizations/nobody"}


@pytest.mark.parametrize("name", ["acme", "orgs/acme", "organizations/", "organizations/Acme", "organizations/a/b"])
async def test_get_with_a_malformed_name_is_invalid(service: OrganizationService, name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.get(name)

    assert caught.value.reason == "INVALID_NAME"
    assert only_violation(caught.value)[0] == "name"


# --- list -----------------------------------------------------------------------------------------


async def test_list_pages_through_everything_without_gap_or_repeat(service: OrganizationService) -> None:
    ids = ["g", "c", "a", "e", "b", "f", "d"]
    await seed(service, [f"org-{i}" for i in ids])

    pages = await all_pages(service, "", 3)

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for page in pages for i in page] == [f"org-{i}" for i in sorted(ids)]


async def test_list_with_an_exact_multiple_has_no_empty_last_page(service: OrganizationService) -> None:
    await seed(service, [f"org-{i}" for i in range(6)])

    pages = await all_pages(service, "", 3)

    assert pages == [["org-0", "org-1", "org-2"], ["org-3", "org-4", "org-5"]]


async def test_list_is_keyset_paged_so_deleting_a_seen_item_shifts_nothing(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    await seed(service, [f"org-{i}" for i in range(7)])
    first = await service.list_organizations("", 3, "")
    del store.items["org-0"]  # someone deletes an item the caller already saw

    second = await service.list_organizations("", 3, first.next_page_token)

    assert [o.id for o in second.organizations] == ["org-3", "org-4", "org-5"]


async def test_list_uses_the_default_page_size_when_zero(service: OrganizationService) -> None:
    await seed(service, [f"org-{i:02d}" for i in range(51)])

    page = await service.list_organizations("", 0, "")

    assert len(page.organizations) == 50
    assert page.next_page_token


async def test_list_of_nothing_is_one_empty_page(service: OrganizationService) -> None:
    page = await service.list_organizations("", 10, "")
    assert page.organizations == []
    assert page.next_page_token == ""


async def test_filter_by_display_name(service: OrganizationService) -> None:
    await service.create("Clinic A", None, "clinic-a")
    await service.create("Clinic B", None, "clinic-b")

    page = await service.list_organizations('display_name = "Clinic B"', 10, "")

    assert [o.id for o in page.organizations] == ["clinic-b"]


async def test_filter_by_kind_enum_name(service: OrganizationService) -> None:
    await seed(service, ["c-1", "c-2", "x-3"], CARE_PROVIDER)
    await service.ensure_manufacturer("Acme Devices")

    manufacturers = await service.list_organizations("kind = KIND_MANUFACTURER", 10, "")
    care_providers = await service.list_organizations("kind = KIND_CARE_PROVIDER", 10, "")
    others = await service.list_organizations("kind != KIND_MANUFACTURER", 10, "")

    assert [o.id for o in manufacturers.organizations] == [MANUFACTURER_ID]
    assert [o.id for o in care_providers.organizations] == ["c-1", "c-2", "x-3"]
    assert [o.id for o in others.organizations] == ["c-1", "c-2", "x-3"]


async def test_filter_terms_are_anded(service: OrganizationService) -> None:
    await service.ensure_manufacturer("Acme")  # right name, wrong kind
    await service.create("Acme", CARE_PROVIDER, "acme-clinic")
    await service.create("Other", CARE_PROVIDER, "other")  # right kind, wrong name

    page = await service.list_organizations('kind = KIND_CARE_PROVIDER AND display_name = "Acme"', 10, "")

    assert [o.id for o in page.organizations] == ["acme-clinic"]


async def test_filtered_paging_skips_non_matching_items(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    # Seeded in the repository: the service would refuse a second manufacturer, and what is
    # under test is how a filter skips items across pages.
    for i in range(10):
        store.put(an_organization(f"org-{i}", MANUFACTURER if i % 2 else CARE_PROVIDER))

    manufacturers = await all_pages(service, "kind = KIND_MANUFACTURER", 2)
    care_providers = await all_pages(service, "kind = KIND_CARE_PROVIDER", 2)

    assert manufacturers == [["org-1", "org-3"], ["org-5", "org-7"], ["org-9"]]
    assert care_providers == [["org-0", "org-2"], ["org-4", "org-6"], ["org-8"]]


@pytest.mark.parametrize(
    "filter_text",
    [
        'colour = "red"',  # not a filterable field
        "create_time = 5",  # not filterable, and not a word
        'display_name = "x" OR kind = KIND_MANUFACTURER',  # only AND
        'display_name = "x" AND',  # dangling AND
        "display_name =",  # no value
        'display_name "x"',  # no operator
        "display_name = 'x'",  # single quotes are not strings
        'display_name = "unterminated',
        "kind = KIND_UNSPECIFIED",  # not a kind a resource can have
        "kind = KIND_ROBOT",
        'display_name < "x"',
        "(kind = KIND_MANUFACTURER)",
    ],
)
async def test_bad_filter_is_invalid_argument_on_filter(service: OrganizationService, filter_text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.list_organizations(filter_text, 10, "")

    assert caught.value.reason == "INVALID_FILTER"
    assert only_violation(caught.value)[0] == "filter"


async def test_page_token_cannot_be_reused_with_another_filter(service: OrganizationService) -> None:
    await seed(service, ["a-1", "a-2", "a-3"], CARE_PROVIDER)
    first = await service.list_organizations("kind = KIND_CARE_PROVIDER", 2, "")
    assert first.next_page_token

    with pytest.raises(InvalidArgument) as caught:
        await service.list_organizations("kind = KIND_MANUFACTURER", 2, first.next_page_token)

    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert only_violation(caught.value)[0] == "page_token"


@pytest.mark.parametrize("token", ["garbage", "!!!!", "e30", "W10", "eyJhIjoxLCJxIjoyfQ"])
async def test_garbage_page_token_is_invalid(service: OrganizationService, token: str) -> None:
    # "e30" is {} and "W10" is [], "eyJhIjoxLCJxIjoyfQ" is {"a":1,"q":2}: decodable, but not ours.
    with pytest.raises(InvalidArgument) as caught:
        await service.list_organizations("", 2, token)

    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert only_violation(caught.value)[0] == "page_token"


# --- update ---------------------------------------------------------------------------------------


async def test_update_changes_only_masked_fields(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    before = await service.create("Acme", CARE_PROVIDER, "acme")

    # A kind the organization may not have is no error while it is not in the mask.
    after = await service.update(
        "organizations/acme", OrganizationChanges(display_name=" Acme GmbH ", kind=MANUFACTURER), ["display_name"], ""
    )

    assert after.display_name == "Acme GmbH"
    assert after.kind is CARE_PROVIDER  # not in the mask
    assert after.revision == 2
    assert after.etag != before.etag
    assert after.create_time == before.create_time
    assert after.update_time >= before.update_time
    assert store.items["acme"] == after


async def test_update_kind_only(service: OrganizationService) -> None:
    await service.create("Acme", CARE_PROVIDER, "acme")

    after = await service.update(
        "organizations/acme", OrganizationChanges(display_name="ignored", kind=CARE_PROVIDER), ["kind"], ""
    )

    assert (after.display_name, after.kind, after.revision) == ("Acme", CARE_PROVIDER, 2)


async def test_the_manufacturer_keeps_its_kind_and_may_be_renamed(service: OrganizationService) -> None:
    await service.ensure_manufacturer("Acme Devices")

    after = await service.update(
        "organizations/manufacturer", OrganizationChanges("Acme Medical Devices", MANUFACTURER), ["*"], ""
    )

    assert (after.display_name, after.kind, after.revision) == ("Acme Medical Devices", MANUFACTURER, 2)


@pytest.mark.parametrize(
    ("organization_id", "kind"),
    [
        ("acme", MANUFACTURER),  # a second manufacturer
        (MANUFACTURER_ID, CARE_PROVIDER),  # no manufacturer at all
        (MANUFACTURER_ID, None),
    ],
)
async def test_update_cannot_make_or_unmake_the_manufacturer(
    service: OrganizationService,
    store: InMemoryRepository[Organization],
    trail: RecordingAuditTrail,
    organization_id: str,
    kind: OrganizationKind | None,
) -> None:
    await service.ensure_manufacturer("Acme Devices")
    await service.create("Acme", CARE_PROVIDER, "acme")
    trail.events.clear()
    before = dict(store.items)

    for mask in (["kind"], ["*"]):
        with pytest.raises(InvalidArgument) as caught:
            await service.update(f"organizations/{organization_id}", OrganizationChanges("New", kind), mask, "")
        assert caught.value.reason == "KIND_NOT_ALLOWED"
        assert only_violation(caught.value)[0] == "organization.kind"

    assert store.items == before
    assert trail.events == []


async def test_update_to_an_unspecified_kind_is_rejected(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    before = await service.create("Acme", CARE_PROVIDER, "acme")

    with pytest.raises(InvalidArgument) as caught:
        await service.update("organizations/acme", OrganizationChanges("Acme"), ["kind"], "")

    assert caught.value.reason == "REQUIRED_FIELD"
    assert only_violation(caught.value)[0] == "organization.kind"
    assert store.items["acme"] == before


async def test_update_star_changes_every_updatable_field(service: OrganizationService) -> None:
    before = await service.create("Acme", CARE_PROVIDER, "acme")

    after = await service.update(
        "organizations/acme", OrganizationChanges(display_name="Clinic", kind=CARE_PROVIDER), ["*"], before.etag
    )

    assert (after.id, after.display_name, after.kind, after.revision) == ("acme", "Clinic", CARE_PROVIDER, 2)


async def test_update_with_empty_mask_is_rejected(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    before = await service.create("Acme", CARE_PROVIDER, "acme")

    with pytest.raises(InvalidArgument) as caught:
        await service.update("organizations/acme", OrganizationChanges(display_name="New"), [], "")

    assert caught.value.reason == "EMPTY_UPDATE_MASK"
    assert only_violation(caught.value)[0] == "update_mask"
    assert store.items["acme"] == before


@pytest.mark.parametrize("mask", [["name"], ["create_time"], ["display_name", "etag"], ["*", "kind"]])
async def test_update_of_a_field_that_is_not_updatable_is_rejected(
    service: OrganizationService, store: InMemoryRepository[Organization], mask: list[str]
) -> None:
    before = await service.create("Acme", CARE_PROVIDER, "acme")

    with pytest.raises(InvalidArgument) as caught:
        await service.update("organizations/acme", OrganizationChanges(display_name="New"), mask, "")

    assert caught.value.reason == "FIELD_NOT_UPDATABLE"
    assert only_violation(caught.value)[0] == "update_mask"
    assert store.items["acme"] == before


async def test_update_cannot_blank_the_display_name(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    before = await service.create("Acme", CARE_PROVIDER, "acme")

    with pytest.raises(InvalidArgument) as caught:
        await service.update("organizations/acme", OrganizationChanges(display_name="  "), ["display_name"], "")

    assert only_violation(caught.value) == ("organization.display_name", "is required")
    assert store.items["acme"] == before


async def test_update_with_the_current_etag_succeeds_and_a_stale_one_is_aborted(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    created = await service.create("Acme", CARE_PROVIDER, "acme")
    updated = await service.update("organizations/acme", OrganizationChanges("Acme 2"), ["display_name"], created.etag)

    with pytest.raises(Aborted) as caught:
        await service.update("organizations/acme", OrganizationChanges("Acme 3"), ["display_name"], created.etag)

    assert caught.value.reason == "ETAG_MISMATCH"
    assert store.items["acme"] == updated


async def test_update_that_loses_a_race_is_aborted() -> None:
    store = RacingRepository("organization")
    trail = RecordingAuditTrail()
    service = OrganizationService(store, trail, MANUFACTURER_ID)
    store.put(an_organization("acme"))

    with pytest.raises(Aborted):
        await service.update("organizations/acme", OrganizationChanges("Mine"), ["display_name"], "")

    assert store.items["acme"].display_name == "written meanwhile"
    assert trail.events == []


async def test_update_of_unknown_is_not_found(service: OrganizationService) -> None:
    with pytest.raises(NotFound) as caught:
        await service.update("organizations/nobody", OrganizationChanges("x"), ["display_name"], "")
    assert caught.value.reason == "ORGANIZATION_NOT_FOUND"


# --- delete ---------------------------------------------------------------------------------------


async def test_delete_with_the_right_etag(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    created = await service.create("Acme", CARE_PROVIDER, "acme")

    await service.delete("organizations/acme", created.etag)

    assert store.items == {}
    with pytest.raises(NotFound):
        await service.get("organizations/acme")


async def test_delete_without_etag_is_unconditional(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    await service.create("Acme", CARE_PROVIDER, "acme")
    await service.delete("organizations/acme", "")
    assert store.items == {}


async def test_delete_with_a_wrong_etag_is_aborted_and_keeps_the_resource(
    service: OrganizationService, store: InMemoryRepository[Organization]
) -> None:
    created = await service.create("Acme", CARE_PROVIDER, "acme")
    await service.update("organizations/acme", OrganizationChanges("Acme 2"), ["display_name"], "")

    for etag in (created.etag, "0123456789abcdef"):
        with pytest.raises(Aborted) as caught:
            await service.delete("organizations/acme", etag)
        assert caught.value.reason == "ETAG_MISMATCH"

    assert store.items["acme"].display_name == "Acme 2"


async def test_delete_that_loses_a_race_is_aborted() -> None:
    store = RacingRepository("organization")
    trail = RecordingAuditTrail()
    store.put(an_organization("acme"))

    with pytest.raises(Aborted):
        await OrganizationService(store, trail, MANUFACTURER_ID).delete("organizations/acme", "")

    assert "acme" in store.items
    assert trail.events == []


async def test_delete_of_unknown_is_not_found(service: OrganizationService) -> None:
    with pytest.raises(NotFound) as caught:
        await service.delete("organizations/nobody", "")
    assert caught.value.reason == "ORGANIZATION_NOT_FOUND"


# --- audit ----------------------------------------------------------------------------------------


def admin_actor() -> AuditActor:
    return AuditActor(PLATFORM_ADMIN.subject, PLATFORM_ADMIN.organization, "platform_admin")


async def test_each_mutation_records_one_event_about_the_organization(
    service: OrganizationService, trail: RecordingAuditTrail
) -> None:
    method = "/medmesh.organization.v1.OrganizationService/CreateOrganization"
    with acting_as(PLATFORM_ADMIN, method, "198.51.100.7"):
        created = await service.create("Clinic", None, "clinic")
    assert len(trail.events) == 1
    event = trail.events[0]
    assert (event.organization, event.resource) == ("organizations/clinic", "organizations/clinic")
    assert event.actor == admin_actor()
    assert (event.method, event.source_ip) == (method.lstrip("/"), "198.51.100.7")
    assert (event.service, event.outcome) == ("organization", Outcome.SUCCEEDED)
    assert (event.phi_fields_read, event.phi_fields_changed) == ((), ())  # no PHI in organizations

    await service.update("organizations/clinic", OrganizationChanges("Clinic 2"), ["display_name"], created.etag)
    assert len(trail.events) == 2
    assert (trail.events[1].organization, trail.events[1].resource) == ("organizations/clinic", "organizations/clinic")
    assert trail.events[1].description == "changed display_name"
    assert trail.events[1].actor == admin_actor()

    await service.delete("organizations/clinic", "")
    assert len(trail.events) == 3
    assert (trail.events[2].organization, trail.events[2].resource) == ("organizations/clinic", "organizations/clinic")
    assert trail.events[2].actor == admin_actor()
    assert len({e.id for e in trail.events}) == 3


async def test_the_update_event_names_every_field_in_the_mask(
    service: OrganizationService, trail: RecordingAuditTrail
) -> None:
    await service.create("Clinic", None, "clinic")

    await service.update("organizations/clinic", OrganizationChanges("Clinic 2", CARE_PROVIDER), ["*"], "")

    assert trail.events[-1].description == "changed display_name, kind"


async def test_reads_record_nothing(service: OrganizationService, trail: RecordingAuditTrail) -> None:
    await seed(service, ["a-1", "a-2", "a-3"])
    trail.events.clear()

    await service.get("organizations/a-1")
    await all_pages(service, "", 2)
    await service.list_organizations("kind = KIND_CARE_PROVIDER", 10, "")
    with pytest.raises(NotFound):
        await service.get("organizations/nobody")

    assert trail.events == []


async def test_mutations_that_fail_record_nothing(service: OrganizationService, trail: RecordingAuditTrail) -> None:
    created = await service.create("Clinic", None, "clinic")
    await service.update("organizations/clinic", OrganizationChanges("Clinic 2"), ["display_name"], "")
    trail.events.clear()

    with pytest.raises(AlreadyExists):
        await service.create("Again", None, "clinic")
    with pytest.raises(InvalidArgument):
        await service.create("", None, "other")
    with pytest.raises(Aborted):
        await service.update("organizations/clinic", OrganizationChanges("Stale"), ["display_name"], created.etag)
    with pytest.raises(NotFound):
        await service.update("organizations/nobody", OrganizationChanges("x"), ["display_name"], "")
    with pytest.raises(Aborted):
        await service.delete("organizations/clinic", created.etag)
    with pytest.raises(NotFound):
        await service.delete("organizations/nobody", "")

    assert trail.events == []


# --- servicer: protobuf <-> domain ----------------------------------------------------------------


@pytest.fixture
def servicer(service: OrganizationService) -> OrganizationServicer:
    return OrganizationServicer(service)


async def test_servicer_create_maps_unspecified_kind_to_care_provider(servicer: OrganizationServicer) -> None:
    request = pb.CreateOrganizationRequest(
        organization=pb.Organization(display_name="Clinic"), organization_id="clinic"
    )

    reply = await servicer.CreateOrganization(request, None)

    assert reply.name == "organizations/clinic"
    assert reply.kind == pb.Organization.KIND_CARE_PROVIDER
    assert reply.display_name == "Clinic"
    assert reply.etag


async def test_servicer_create_refuses_kind_manufacturer(
    servicer: OrganizationServicer, store: InMemoryRepository[Organization]
) -> None:
    request = pb.CreateOrganizationRequest(
        organization=pb.Organization(display_name="Acme", kind=pb.Organization.KIND_MANUFACTURER),
        organization_id="acme",
    )

    with pytest.raises(InvalidArgument) as caught:
        await servicer.CreateOrganization(request, None)

    assert caught.value.reason == "KIND_NOT_ALLOWED"
    assert store.items == {}


async def test_servicer_update_passes_mask_and_etag(servicer: OrganizationServicer) -> None:
    created = await servicer.CreateOrganization(
        pb.CreateOrganizationRequest(
            organization=pb.Organization(display_name="Acme", kind=pb.Organization.KIND_CARE_PROVIDER),
            organization_id="acme",
        ),
        None,
    )
    request = pb.UpdateOrganizationRequest(
        organization=pb.Organization(
            name="organizations/acme",
            display_name="Renamed",
            kind=pb.Organization.KIND_MANUFACTURER,  # outside the mask: neither applied nor refused
            etag=created.etag,
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )

    reply = await servicer.UpdateOrganization(request, None)

    assert (reply.display_name, reply.kind) == ("Renamed", pb.Organization.KIND_CARE_PROVIDER)
    assert reply.etag != created.etag
    with pytest.raises(Aborted):
        await servicer.UpdateOrganization(request, None)  # the same etag again is stale now


async def test_servicer_list_returns_pages_and_token(
    servicer: OrganizationServicer, service: OrganizationService
) -> None:
    await seed(service, ["a-1", "a-2", "a-3"])

    first = await servicer.ListOrganizations(pb.ListOrganizationsRequest(page_size=2), None)
    second = await servicer.ListOrganizations(
        pb.ListOrganizationsRequest(page_size=2, page_token=first.next_page_token), None
    )

    assert [o.name for o in first.organizations] == ["organizations/a-1", "organizations/a-2"]
    assert [o.name for o in second.organizations] == ["organizations/a-3"]
    assert second.next_page_token == ""
