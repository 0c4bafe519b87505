"""AuditService use cases against an in-memory store: idempotent ingest, newest-first paging,
filters, and who may read which trail; plus the servicers' translation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from medmesh.audit.v1 import audit_service_pb2 as pb
from medmesh.runtime.audit import AuditActor, AuditEvent, Outcome, new_event_id
from medmesh.runtime.audit_outbox import event_to_pb
from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from medmesh.runtime.filtering import Condition
from services.audit.repository import InsertResult
from services.audit.service import AuditService
from services.audit.servicer import AuditIngestServicer, AuditServicer

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ORG_A = "organizations/a"
ORG_B = "organizations/b"
PLATFORM_ADMIN = Principal("organizations/manufacturer/users/root", "organizations/manufacturer", Role.PLATFORM_ADMIN)
ADMIN_A = Principal("organizations/a/users/admin", ORG_A, Role.ORGANIZATION_ADMIN)
NOT_READERS = [
    Principal("organizations/a/users/doc", ORG_A, Role.CLINICIAN),
    Principal("organizations/a/users/op", ORG_A, Role.OPERATOR),
    Principal("organizations/a/users/pat", ORG_A, Role.PATIENT, patient="organizations/a/patients/p"),
]


class InMemoryAuditEvents:
    """Behaves like AuditEventRepository: insert-only, ids stored once, listed newest (highest id) first."""

    def __init__(self) -> None:
        self.events: dict[str, AuditEvent] = {}

    async def insert_batch(self, events: Sequence[AuditEvent]) -> InsertResult:
        stored = 0
        for event in events:
            if event.id not in self.events:
                self.events[event.id] = event
                stored += 1
        return InsertResult(stored, len(events) - stored)

    async def get(self, organization: str, event_id: str) -> AuditEvent | None:
        event = self.events.get(event_id)
        return event if event is not None and event.organization == organization else None

    async def list(self, conditions: Sequence[Condition], after: str | None, limit: int) -> list[AuditEvent]:
        matching = [
            event
            for key, event in sorted(self.events.items(), reverse=True)
            if (after is None or key < after) and all(c.matches(event) for c in conditions)
        ]
        return matching[:limit]


def an_event(
    seconds: float,
    organization: str = ORG_A,
    *,
    resource: str = "organizations/a/patients/p",
    subject: str = "organizations/a/users/doc",
    method: str = "medmesh.patient.v1.PatientService/GetPatient",
    outcome: Outcome = Outcome.SUCCEEDED,
) -> AuditEvent:
    at = T0 + timedelta(seconds=seconds)
    return AuditEvent(
        id=new_event_id(at),
        organization=organization,
        resource=resource,
        event_time=at,
        actor=AuditActor(subject, organization, "clinician"),
        method=method,
        service="patient",
        outcome=outcome,
        phi_fields_read=("given_name", "birth_date"),
        source_ip="10.0.0.7",
        trace_id="ab" * 16,
    )


@pytest.fixture
def store() -> InMemoryAuditEvents:
    return InMemoryAuditEvents()


@pytest.fixture
def service(store: InMemoryAuditEvents) -> AuditService:
    return AuditService(store)


@pytest.fixture
def as_platform_admin() -> Iterator[None]:
    with acting_as(PLATFORM_ADMIN):
        yield


async def seed(store: InMemoryAuditEvents, events: list[AuditEvent]) -> list[AuditEvent]:
    await store.insert_batch(events)
    return events


async def all_pages(service: AuditService, parent: str, filter_text: str, page_size: int) -> list[list[str]]:
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await service.list_events(parent, filter_text, page_size, token)
        pages.append([e.id for e in page.audit_events])
        token = page.next_page_token
        if not token:
            return pages
        assert len(pages) < 100, "paging does not terminate"


# --- ingest ---------------------------------------------------------------------------------------


async def test_ingest_is_idempotent_per_event_id(service: AuditService, store: InMemoryAuditEvents) -> None:
    first = [an_event(i) for i in range(3)]
    with acting_as(internal_principal("patient")):
        assert await service.write(first) == InsertResult(3, 0)
        assert await service.write(first) == InsertResult(0, 3)
        # A resend that overlaps new events: only the new one is stored.
        assert await service.write([*first[1:], an_event(9)]) == InsertResult(1, 2)
        # The same event twice in one batch is stored once.
        twice = an_event(10)
        assert await service.write([twice, twice]) == InsertResult(1, 1)
    assert len(store.events) == 5


async def test_a_duplicate_never_replaces_what_was_stored(service: AuditService, store: InMemoryAuditEvents) -> None:
    original = an_event(1)
    forged = AuditEvent(**{**original.__dict__, "description": "rewritten"})
    with acting_as(internal_principal("patient")):
        await service.write([original])
        assert await service.write([forged]) == InsertResult(0, 1)
    assert store.events[original.id].description == ""


@pytest.mark.parametrize("principal", [PLATFORM_ADMIN, ADMIN_A])
async def test_ingest_takes_only_the_mesh_credential(service: AuditService, principal: Principal) -> None:
    with acting_as(principal), pytest.raises(PermissionDenied) as caught:
        await service.write([an_event(1)])
    assert caught.value.reason == "INTERNAL_ONLY"


# --- list: newest first, keyset paging ------------------------------------------------------------


@pytest.mark.usefixtures("as_platform_admin")
async def test_list_pages_newest_first_with_no_gap_or_repeat(service: AuditService, store: InMemoryAuditEvents) -> None:
    events = await seed(store, [an_event(i) for i in range(25)])
    await seed(store, [an_event(i + 0.5, ORG_B) for i in range(5)])

    pages = await all_pages(service, ORG_A, "", 7)

    assert [len(p) for p in pages] == [7, 7, 7, 4]
    assert [i for page in pages for i in page] == [e.id for e in reversed(events)]


@pytest.mark.usefixtures("as_platform_admin")
async def test_events_arriving_between_pages_do_not_shift_the_next_page(
    service: AuditService, store: InMemoryAuditEvents
) -> None:
    events = await seed(store, [an_event(i) for i in range(10)])
    first = await service.list_events(ORG_A, "", 4, "")
    await seed(store, [an_event(100), an_event(101)])  # newer: they belong before page one

    second = await service.list_events(ORG_A, "", 4, first.next_page_token)

    newest_first = [e.id for e in reversed(events)]
    assert [e.id for e in first.audit_events] == newest_first[:4]
    assert [e.id for e in second.audit_events] == newest_first[4:8]


@pytest.mark.usefixtures("as_platform_admin")
async def test_a_page_of_exactly_the_rest_has_no_token(service: AuditService, store: InMemoryAuditEvents) -> None:
    await seed(store, [an_event(i) for i in range(6)])
    assert [len(p) for p in await all_pages(service, ORG_A, "", 3)] == [3, 3]
    assert [len(p) for p in await all_pages(service, ORG_A, "", 0)] == [6]  # 0: the default size


@pytest.mark.usefixtures("as_platform_admin")
async def test_every_organization_for_platform_admins(service: AuditService, store: InMemoryAuditEvents) -> None:
    events = await seed(store, [an_event(i, ORG_A if i % 2 else ORG_B) for i in range(9)])

    pages = await all_pages(service, "organizations/-", "", 4)

    assert [i for page in pages for i in page] == [e.id for e in reversed(events)]


@pytest.mark.usefixtures("as_platform_admin")
async def test_a_page_token_is_bound_to_parent_and_filter(service: AuditService, store: InMemoryAuditEvents) -> None:
    await seed(store, [an_event(i) for i in range(5)] + [an_event(i, ORG_B) for i in range(5)])
    token = (await service.list_events(ORG_A, "", 2, "")).next_page_token
    assert token

    for parent, filter_text in [(ORG_B, ""), ("organizations/-", ""), (ORG_A, 'outcome = "DENIED"')]:
        with pytest.raises(InvalidArgument) as caught:
            await service.list_events(parent, filter_text, 2, token)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"


# --- list: filters --------------------------------------------------------------------------------


@pytest.mark.usefixtures("as_platform_admin")
async def test_filters_over_resource_actor_method_outcome_and_time(
    service: AuditService, store: InMemoryAuditEvents
) -> None:
    other_patient = an_event(1, resource="organizations/a/patients/q")
    other_actor = an_event(2, subject="organizations/a/users/nurse")
    update = an_event(3, method="medmesh.patient.v1.PatientService/UpdatePatient")
    denied = an_event(4, outcome=Outcome.DENIED)
    plain = [an_event(5), an_event(6)]
    await seed(store, [other_patient, other_actor, update, denied, *plain])

    async def ids(filter_text: str) -> list[str]:
        return [i for page in await all_pages(service, ORG_A, filter_text, 50) for i in page]

    assert await ids('resource = "organizations/a/patients/q"') == [other_patient.id]
    assert await ids('actor = "organizations/a/users/nurse"') == [other_actor.id]
    assert await ids('method = "medmesh.patient.v1.PatientService/UpdatePatient"') == [update.id]
    assert await ids('method = "/medmesh.patient.v1.PatientService/UpdatePatient"') == [update.id]
    assert await ids("outcome = OUTCOME_DENIED") == [denied.id]
    assert await ids("outcome = DENIED") == [denied.id]
    assert len(await ids("outcome != DENIED")) == 5
    assert await ids('event_time >= "2026-01-01T00:00:03Z" AND event_time < "2026-01-01T00:00:05Z"') == [
        denied.id,
        update.id,
    ]
    assert await ids('event_time > "2026-01-01T00:00:05Z"') == [plain[1].id]
    assert await ids('event_time <= "2026-01-01T01:00:02+01:00"') == [other_actor.id, other_patient.id]
    assert await ids(
        'actor = "organizations/a/users/doc" AND outcome = SUCCEEDED AND event_time > "2026-01-01T00:00:02Z"'
    ) == [
        plain[1].id,
        plain[0].id,
        update.id,
    ]


@pytest.mark.usefixtures("as_platform_admin")
@pytest.mark.parametrize(
    "text",
    [
        'service = "patient"',
        "outcome = MAYBE",
        'event_time >= "2026-01-01"',
        'resource >= "organizations/a"',
        'organization = "organizations/b"',  # the parent says which organization; a filter cannot widen it
    ],
)
async def test_bad_filters_are_invalid_argument(service: AuditService, text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.list_events(ORG_A, text, 10, "")
    assert caught.value.reason == "INVALID_FILTER"


# --- access ---------------------------------------------------------------------------------------


async def test_platform_admin_reads_any_organization(service: AuditService, store: InMemoryAuditEvents) -> None:
    in_a, in_b = await seed(store, [an_event(1), an_event(2, ORG_B)])
    with acting_as(PLATFORM_ADMIN):
        assert await service.get(f"{ORG_A}/auditEvents/{in_a.id}") == in_a
        assert await service.get(f"{ORG_B}/auditEvents/{in_b.id}") == in_b
        assert [e.id for e in (await service.list_events(ORG_B, "", 10, "")).audit_events] == [in_b.id]


async def test_organization_admin_reads_only_their_own(service: AuditService, store: InMemoryAuditEvents) -> None:
    in_a, in_b = await seed(store, [an_event(1), an_event(2, ORG_B)])
    with acting_as(ADMIN_A):
        assert await service.get(f"{ORG_A}/auditEvents/{in_a.id}") == in_a
        assert [e.id for e in (await service.list_events(ORG_A, "", 10, "")).audit_events] == [in_a.id]
        for call in (
            service.get(f"{ORG_B}/auditEvents/{in_b.id}"),
            service.list_events(ORG_B, "", 10, ""),
            service.list_events("organizations/-", "", 10, ""),
        ):
            with pytest.raises(PermissionDenied) as caught:
                await call
            assert caught.value.reason == "ORGANIZATION_ACCESS_DENIED"


@pytest.mark.parametrize("principal", NOT_READERS, ids=lambda p: str(p.role))
async def test_other_roles_read_no_trail_not_even_their_own(
    service: AuditService, store: InMemoryAuditEvents, principal: Principal
) -> None:
    (own,) = await seed(store, [an_event(1, subject=principal.subject)])
    with acting_as(principal):
        for call in (
            service.get(f"{ORG_A}/auditEvents/{own.id}"),
            service.list_events(ORG_A, "", 10, ""),
            service.list_events("organizations/-", "", 10, ""),
        ):
            with pytest.raises(PermissionDenied) as caught:
                await call
            assert caught.value.reason == "ROLE_NOT_ALLOWED"


async def test_no_credentials_is_unauthenticated(service: AuditService) -> None:
    with pytest.raises(Unauthenticated):
        await service.list_events(ORG_A, "", 10, "")


@pytest.mark.parametrize(
    ("principal", "name"),
    [
        (ADMIN_A, f"{ORG_B}/auditEvents/missing"),  # another organization
        (NOT_READERS[0], f"{ORG_A}/auditEvents/missing"),  # their own, but not their role
    ],
)
async def test_permission_denied_comes_before_not_found(service: AuditService, principal: Principal, name: str) -> None:
    with acting_as(principal), pytest.raises(PermissionDenied):
        await service.get(name)


async def test_an_event_is_found_only_under_its_own_organization(
    service: AuditService, store: InMemoryAuditEvents
) -> None:
    (in_b,) = await seed(store, [an_event(1, ORG_B)])
    with acting_as(ADMIN_A), pytest.raises(NotFound) as caught:
        await service.get(f"{ORG_A}/auditEvents/{in_b.id}")
    assert caught.value.reason == "AUDIT_EVENT_NOT_FOUND"
    with acting_as(PLATFORM_ADMIN), pytest.raises(NotFound):
        await service.get(f"{ORG_A}/auditEvents/{in_b.id}")


@pytest.mark.usefixtures("as_platform_admin")
@pytest.mark.parametrize("name", ["organizations/a", "organizations/a/auditEvents/", "organizations/A/auditEvents/x"])
async def test_malformed_names_are_invalid_argument(service: AuditService, name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await service.get(name)
    assert caught.value.reason == "INVALID_NAME"


# --- servicers ------------------------------------------------------------------------------------


async def test_ingest_servicer_counts_stored_and_duplicates(service: AuditService, store: InMemoryAuditEvents) -> None:
    servicer = AuditIngestServicer(service)
    events = [an_event(i) for i in range(3)]
    request = pb.WriteAuditEventsRequest(audit_events=[event_to_pb(e) for e in events])
    with acting_as(internal_principal("patient")):
        first = await servicer.WriteAuditEvents(request, None)  # type: ignore[arg-type]
        again = await servicer.WriteAuditEvents(request, None)  # type: ignore[arg-type]
    assert (first.stored_count, first.duplicate_count) == (3, 0)
    assert (again.stored_count, again.duplicate_count) == (0, 3)
    assert sorted(store.events.values(), key=lambda e: e.id) == events


@pytest.mark.parametrize(
    ("broken", "field"),
    [
        (pb.AuditEvent(name="organizations/a/events/x"), "audit_events[1].name"),
        (
            pb.AuditEvent(name="organizations/a/auditEvents/x", outcome=pb.AuditEvent.OUTCOME_DENIED),
            "audit_events[1].event_time",
        ),
    ],
)
async def test_ingest_servicer_names_the_bad_event_and_stores_none(
    service: AuditService, store: InMemoryAuditEvents, broken: pb.AuditEvent, field: str
) -> None:
    request = pb.WriteAuditEventsRequest(audit_events=[event_to_pb(an_event(1)), broken])
    with acting_as(internal_principal("patient")), pytest.raises(InvalidArgument) as caught:
        await AuditIngestServicer(service).WriteAuditEvents(request, None)  # type: ignore[arg-type]
    assert [v.field for v in caught.value.field_violations] == [field]
    assert store.events == {}


async def test_ingest_refuses_an_unspecified_outcome(service: AuditService) -> None:
    message = event_to_pb(an_event(1))
    message.outcome = pb.AuditEvent.OUTCOME_UNSPECIFIED
    with acting_as(internal_principal("patient")), pytest.raises(InvalidArgument) as caught:
        await AuditIngestServicer(service).WriteAuditEvents(pb.WriteAuditEventsRequest(audit_events=[message]), None)  # type: ignore[arg-type]
    assert [v.field for v in caught.value.field_violations] == ["audit_events[0].outcome"]


@pytest.mark.usefixtures("as_platform_admin")
async def test_list_servicer_answers_names_newest_first(service: AuditService, store: InMemoryAuditEvents) -> None:
    events = await seed(store, [an_event(i) for i in range(3)])
    request = pb.ListAuditEventsRequest(parent=ORG_A, page_size=2)

    reply = await AuditServicer(service).ListAuditEvents(request, None)  # type: ignore[arg-type]

    assert [e.name for e in reply.audit_events] == [f"{ORG_A}/auditEvents/{e.id}" for e in reversed(events[1:])]
    assert reply.audit_events[0].phi_fields_read == ["given_name", "birth_date"]
    assert reply.audit_events[0].outcome == pb.AuditEvent.OUTCOME_SUCCEEDED
    assert reply.next_page_token
    got = await AuditServicer(service).GetAuditEvent(pb.GetAuditEventRequest(name=reply.audit_events[1].name), None)  # type: ignore[arg-type]
    assert got == reply.audit_events[1]
