"""ObservationService against in-memory fakes: idempotent ingest, tenancy, paging, aggregation, latest."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from services.observation.alerts import BestEffortAlertEvaluator, ObservationSample
from services.observation.domain import (
    DeviceAssignment,
    Observation,
    ObservationDraft,
    Waveform,
    observation_id,
    validate,
)
from services.observation.service import ObservationService
from tests.unit.test_observation_fakes import FakeDeviceDirectory, InMemoryObservationStore, RecordingAlertEvaluator

ORG_A, ORG_B, MAKER = "organizations/a", "organizations/b", "organizations/maker"
HOME = "organizations/manufacturer"
PATIENT_A = f"{ORG_A}/patients/p1"
DEVICE = "devices/SN-1"  # made by MAKER, in care at ORG_A for PATIENT_A
OTHER_DEVICE = "devices/SN-2"  # in care at ORG_B, no patient
UNASSIGNED = "devices/SN-3"  # owner MAKER only
UNKNOWN = "devices/SN-404"
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
T0 = NOW - timedelta(hours=1)
WRITE = "/medmesh.observation.v1.ObservationInternalService/WriteObservations"
BATCH_CREATE = "/medmesh.observation.v1.ObservationService/BatchCreateObservations"


def user(role: Role, organization: str = ORG_A, kind: str = "users", patient: str = "") -> Principal:
    return Principal(f"{organization}/{kind}/{role.value}", organization, role, patient=patient)


PLATFORM_ADMIN = user(Role.PLATFORM_ADMIN, HOME)
ADMIN_A, ADMIN_B = user(Role.ORGANIZATION_ADMIN), user(Role.ORGANIZATION_ADMIN, ORG_B)
CLINICIAN_A, CLINICIAN_B = user(Role.CLINICIAN), user(Role.CLINICIAN, ORG_B)
OPERATOR_A = user(Role.OPERATOR)
PATIENT_USER = user(Role.PATIENT, patient=PATIENT_A)
INTEGRATOR_A = user(Role.CLINICIAN, kind="serviceAccounts")  # a service account, whatever its role
ADAPTER = internal_principal("mqtt_adapter")


def draft(message_id: str, seconds: float = 0, metric: str = "heart_rate", value: float = 70.0, **kw: Any) -> Any:
    return ObservationDraft(message_id, metric, T0 + timedelta(seconds=seconds), unit="/min", numeric_value=value, **kw)


@pytest.fixture
def store() -> InMemoryObservationStore:
    return InMemoryObservationStore()


@pytest.fixture
def devices() -> FakeDeviceDirectory:
    return FakeDeviceDirectory(
        DeviceAssignment(DEVICE, MAKER, ORG_A, PATIENT_A),
        DeviceAssignment(OTHER_DEVICE, MAKER, ORG_B),
        DeviceAssignment(UNASSIGNED, MAKER),
    )


@pytest.fixture
def alerts() -> RecordingAlertEvaluator:
    return RecordingAlertEvaluator()


@pytest.fixture
def trail() -> RecordingAuditTrail:
    return RecordingAuditTrail("observation")


@pytest.fixture
def service(
    store: InMemoryObservationStore,
    devices: FakeDeviceDirectory,
    alerts: RecordingAlertEvaluator,
    trail: RecordingAuditTrail,
) -> ObservationService:
    return ObservationService(store, devices, alerts, trail, clock=lambda: NOW)


@pytest.fixture(autouse=True)
def as_adapter() -> Iterator[None]:
    """Tests run as the MQTT adapter unless they say otherwise with `acting_as`."""
    with acting_as(ADAPTER, WRITE):
        yield


def outcomes(result: Any) -> list[str]:
    return [r.outcome.value for r in result.results]


def seed(store: InMemoryObservationStore, assignment: DeviceAssignment, *drafts: ObservationDraft) -> list[Observation]:
    stored = []
    for item in drafts:
        observation = validate(item, assignment, NOW)
        assert isinstance(observation, Observation)
        store.items[observation.id] = observation
        stored.append(observation)
    return stored


async def denied(call: Callable[[], Any], principal: Principal, reason: str = "ORGANIZATION_ACCESS_DENIED") -> None:
    with acting_as(principal), pytest.raises(PermissionDenied) as caught:
        await call()
    assert caught.value.reason == reason


# --- internal ingest ------------------------------------------------------------------------------


async def test_a_batch_is_stored_and_answered_item_by_item(
    service: ObservationService, store: InMemoryObservationStore, devices: FakeDeviceDirectory
) -> None:
    batch = [
        draft("m-1", 0),
        draft("m-2", 1, metric="Bad-Metric"),
        draft("m-3", 2, metric="spo2", value=97.0),
        replace(draft("m-4", 3), numeric_value=None, waveform=Waveform(250.0, (0.1, 0.2), None)),
    ]

    result = await service.write(DEVICE, batch)

    assert outcomes(result) == ["STORED", "REJECTED", "STORED", "STORED"]
    rejected = result.results[1]
    assert (rejected.message_id, rejected.reason) == ("m-2", "INVALID_FIELD")
    assert rejected.description.startswith("metric: ")
    assert result.results[0].observation == f"{DEVICE}/observations/{observation_id(DEVICE, 'm-1')}"
    assert {o.message_id for o in store.items.values()} == {"m-1", "m-3", "m-4"}
    assert all((o.organization, o.patient) == (ORG_A, PATIENT_A) for o in store.items.values())
    assert store.batches == [3]  # one write for the batch
    assert devices.asked == [DEVICE]  # one assignment lookup for the batch


async def test_a_batch_sent_twice_is_stored_once(service: ObservationService, store: InMemoryObservationStore) -> None:
    batch = [draft(f"m-{i}", i) for i in range(5)]

    first = await service.write(DEVICE, batch)
    second = await service.write(DEVICE, [*batch, draft("m-5", 5)])

    assert outcomes(first) == ["STORED"] * 5
    assert outcomes(second) == ["DUPLICATE"] * 5 + ["STORED"]
    assert [r.observation for r in second.results[:5]] == [r.observation for r in first.results]
    assert len(store.items) == 6


async def test_the_same_message_twice_in_one_batch_is_stored_once(service: ObservationService) -> None:
    result = await service.write(DEVICE, [draft("m-1", 0), draft("m-1", 0)])

    assert outcomes(result) == ["STORED", "DUPLICATE"]


async def test_message_ids_are_unique_per_device_only(
    service: ObservationService, store: InMemoryObservationStore
) -> None:
    assert outcomes(await service.write(DEVICE, [draft("m-1")])) == ["STORED"]
    assert outcomes(await service.write(OTHER_DEVICE, [draft("m-1")])) == ["STORED"]
    assert len(store.items) == 2


async def test_an_unknown_device_gets_every_item_rejected(
    service: ObservationService, store: InMemoryObservationStore
) -> None:
    result = await service.write(UNKNOWN, [draft("m-1"), draft("m-2")])

    assert outcomes(result) == ["REJECTED", "REJECTED"]
    assert {r.reason for r in result.results} == {"UNKNOWN_DEVICE"}
    assert store.items == {}


async def test_a_registry_outage_is_unavailable_not_a_rejection(
    service: ObservationService, devices: FakeDeviceDirectory, store: InMemoryObservationStore
) -> None:
    # Rejected items are dropped by the device; UNAVAILABLE makes the adapter withhold the ack instead.
    devices.unavailable = True

    with pytest.raises(Unavailable):
        await service.write(DEVICE, [draft("m-1")])
    assert store.items == {}


async def test_a_device_without_a_usable_owner_gets_every_item_rejected(
    service: ObservationService, devices: FakeDeviceDirectory
) -> None:
    devices.assignments[UNASSIGNED] = DeviceAssignment(UNASSIGNED, "")

    result = await service.write(UNASSIGNED, [draft("m-1")])

    assert [r.reason for r in result.results] == ["DEVICE_NOT_ASSIGNED"]


async def test_owner_and_patient_come_from_the_registry_at_ingest_time(
    service: ObservationService, store: InMemoryObservationStore, devices: FakeDeviceDirectory
) -> None:
    await service.write(DEVICE, [draft("before")])
    devices.assignments[DEVICE] = DeviceAssignment(DEVICE, MAKER, ORG_B, f"{ORG_B}/patients/p7")
    await service.write(DEVICE, [draft("after", 1)])
    await service.write(UNASSIGNED, [draft("owner", 2)])

    owners = {o.message_id: (o.organization, o.patient) for o in store.items.values()}
    assert owners == {
        "before": (ORG_A, PATIENT_A),
        "after": (ORG_B, f"{ORG_B}/patients/p7"),
        "owner": (MAKER, ""),
    }


async def test_internal_ingest_is_not_audited(service: ObservationService, trail: RecordingAuditTrail) -> None:
    await service.write(DEVICE, [draft("m-1")])

    assert trail.events == []


async def test_internal_ingest_needs_the_mesh_credential(service: ObservationService) -> None:
    await denied(lambda: service.write(DEVICE, [draft("m-1")]), PLATFORM_ADMIN, "INTERNAL_ONLY")


async def test_several_devices_are_written_together_and_answered_per_device(
    service: ObservationService, store: InMemoryObservationStore, alerts: RecordingAlertEvaluator
) -> None:
    await service.write(DEVICE, [draft("old")])
    batches = [
        (DEVICE, [draft("old"), draft("new", 1), draft("bad", 2, metric="Bad Metric")]),
        ("devices/ghost", [draft("g-1")]),
        (UNASSIGNED, [draft("u-1", 3)]),
        (DEVICE, [draft("later", 4)]),
    ]

    results = await service.write_many(batches)

    assert [outcomes(r) for r in results] == [
        ["DUPLICATE", "STORED", "REJECTED"],
        ["REJECTED"],
        ["STORED"],
        ["STORED"],
    ]
    assert results[1].results[0].reason == "UNKNOWN_DEVICE"
    owners = {o.message_id: o.organization for o in store.items.values()}
    assert owners == {"old": ORG_A, "new": ORG_A, "u-1": MAKER, "later": ORG_A}
    # Alerts see what was stored now, once: not the duplicate.
    assert sorted(s.time.second for s in alerts.samples[1:]) == [1, 3, 4]


async def test_a_multi_device_write_is_bounded_in_all(service: ObservationService) -> None:
    batches = [(DEVICE, [draft(f"m-{d}-{i}", i) for i in range(500)]) for d in range(5)]

    with pytest.raises(InvalidArgument):
        await service.write_many(batches)


async def test_a_multi_device_write_needs_the_mesh_credential(service: ObservationService) -> None:
    await denied(lambda: service.write_many([(DEVICE, [draft("m-1")])]), PLATFORM_ADMIN, "INTERNAL_ONLY")


@pytest.mark.parametrize("size", [0, 501])
async def test_batch_size_is_bounded(service: ObservationService, size: int) -> None:
    with pytest.raises(InvalidArgument):
        await service.write(DEVICE, [draft(f"m-{i}", i) for i in range(size)])


async def test_a_full_batch_is_accepted(service: ObservationService) -> None:
    assert outcomes(await service.write(DEVICE, [draft(f"m-{i}", i) for i in range(500)])) == ["STORED"] * 500


async def test_a_database_outage_fails_the_batch(service: ObservationService, store: InMemoryObservationStore) -> None:
    store.unavailable = True

    with pytest.raises(Unavailable):
        await service.write(DEVICE, [draft("m-1")])


# --- alerts ---------------------------------------------------------------------------------------


async def test_numeric_values_stored_now_go_to_alert_evaluation(
    service: ObservationService, alerts: RecordingAlertEvaluator
) -> None:
    await service.write(DEVICE, [draft("m-1", 0, value=150.0)])
    alerts.calls.clear()

    await service.write(
        DEVICE,
        [
            draft("m-1", 0, value=150.0),  # duplicate: evaluated when it was stored
            draft("m-2", 1, value=151.0),
            draft("m-3", 2, metric="BAD"),
            replace(draft("m-4", 3), numeric_value=None, boolean_value=True),
            draft("m-5", 4, metric="spo2", value=88.0),
        ],
    )

    assert alerts.calls == [
        [
            ObservationSample(DEVICE, ORG_A, PATIENT_A, "heart_rate", 151.0, T0 + timedelta(seconds=1)),
            ObservationSample(DEVICE, ORG_A, PATIENT_A, "spo2", 88.0, T0 + timedelta(seconds=4)),
        ]
    ]


async def test_ingest_succeeds_while_alert_evaluation_fails(
    store: InMemoryObservationStore, devices: FakeDeviceDirectory, trail: RecordingAuditTrail
) -> None:
    failing = RecordingAlertEvaluator(failing=True)
    evaluator = BestEffortAlertEvaluator(failing, clock=lambda: 0.0)
    service = ObservationService(store, devices, evaluator, trail, clock=lambda: NOW)

    result = await service.write(DEVICE, [draft("m-1")])

    assert outcomes(result) == ["STORED"]
    assert len(failing.calls) == 1
    assert evaluator.skipped_samples == 1


# --- public ingest --------------------------------------------------------------------------------


@pytest.mark.parametrize("principal", [ADMIN_A, OPERATOR_A, INTEGRATOR_A, PLATFORM_ADMIN])
async def test_writers_of_the_data_organization_may_batch_create(
    service: ObservationService, trail: RecordingAuditTrail, principal: Principal
) -> None:
    with acting_as(principal, BATCH_CREATE, "10.0.0.9"):
        result = await service.batch_create(DEVICE, [draft("m-1"), draft("m-2", 1, metric="X"), draft("m-1")])

    assert outcomes(result) == ["STORED", "REJECTED", "DUPLICATE"]
    (event,) = trail.events  # one event for the batch, not one per observation
    assert (event.organization, event.resource, event.actor.subject) == (ORG_A, DEVICE, principal.subject)
    assert event.description == "observations: 1 stored, 1 duplicate, 1 rejected"
    assert (event.method, event.source_ip) == (BATCH_CREATE.lstrip("/"), "10.0.0.9")


@pytest.mark.parametrize("principal", [CLINICIAN_A, PATIENT_USER, user(Role.PATIENT, kind="serviceAccounts")])
async def test_other_roles_may_not_batch_create(
    service: ObservationService, store: InMemoryObservationStore, principal: Principal
) -> None:
    await denied(lambda: service.batch_create(DEVICE, [draft("m-1")]), principal, "ROLE_NOT_ALLOWED")
    assert store.items == {}


async def test_another_organizations_device_is_denied(
    service: ObservationService, devices: FakeDeviceDirectory, trail: RecordingAuditTrail
) -> None:
    await denied(lambda: service.batch_create(OTHER_DEVICE, [draft("m-1")]), ADMIN_A)
    # The owner of a device in another organization's care does not own its data either.
    await denied(lambda: service.batch_create(DEVICE, [draft("m-1")]), user(Role.ORGANIZATION_ADMIN, MAKER))
    assert trail.events == []


async def test_an_unknown_device_is_denied_to_tenants_and_not_found_for_platform_admins(
    service: ObservationService,
) -> None:
    await denied(lambda: service.batch_create(UNKNOWN, [draft("m-1")]), ADMIN_A)

    with acting_as(PLATFORM_ADMIN), pytest.raises(NotFound) as caught:
        await service.batch_create(UNKNOWN, [draft("m-1")])
    assert caught.value.reason == "DEVICE_NOT_FOUND"


async def test_the_role_is_checked_before_the_device_is_looked_up(
    service: ObservationService, devices: FakeDeviceDirectory
) -> None:
    await denied(lambda: service.batch_create(DEVICE, [draft("m-1")]), CLINICIAN_A, "ROLE_NOT_ALLOWED")
    assert devices.asked == []


# --- reads: tenancy -------------------------------------------------------------------------------


@pytest.fixture
def seeded(store: InMemoryObservationStore) -> list[Observation]:
    """ORG_A's device with PATIENT_A, a reading of the same device from its earlier care at ORG_B,
    and ORG_B's own device."""
    in_care_a = DeviceAssignment(DEVICE, MAKER, ORG_A, PATIENT_A)
    return [
        *seed(store, in_care_a, draft("a-1", 10), draft("a-2", 20, metric="spo2", value=96.0)),
        *seed(store, DeviceAssignment(DEVICE, MAKER, ORG_B, f"{ORG_B}/patients/p9"), draft("b-old", 5)),
        *seed(store, DeviceAssignment(OTHER_DEVICE, MAKER, ORG_B), draft("b-1", 15)),
    ]


def ids(observations: list[Observation]) -> list[str]:
    return [o.message_id for o in observations]


@pytest.mark.parametrize("principal", [ADMIN_A, CLINICIAN_A, OPERATOR_A])
async def test_members_read_their_organizations_observations_of_a_device(
    service: ObservationService, seeded: list[Observation], principal: Principal
) -> None:
    with acting_as(principal):
        page = await service.list_observations(DEVICE, "", 0, "")

    # Not "b-old": the device's readings from when ORG_B had it stay ORG_B's.
    assert ids(page.observations) == ["a-1", "a-2"]


async def test_platform_admins_read_every_organizations_observations(
    service: ObservationService, seeded: list[Observation]
) -> None:
    with acting_as(PLATFORM_ADMIN):
        page = await service.list_observations(DEVICE, "", 0, "")

    assert ids(page.observations) == ["b-old", "a-1", "a-2"]


async def test_another_organizations_device_reads_as_empty(
    service: ObservationService, seeded: list[Observation]
) -> None:
    with acting_as(CLINICIAN_A):
        page = await service.list_observations(OTHER_DEVICE, "", 0, "")

    assert page.observations == []


async def test_patient_observations(service: ObservationService, seeded: list[Observation]) -> None:
    with acting_as(CLINICIAN_A):
        page = await service.list_observations(PATIENT_A, "", 0, "")

    assert ids(page.observations) == ["a-1", "a-2"]


async def test_another_organizations_patient_is_denied_before_anything_is_read(
    service: ObservationService, seeded: list[Observation]
) -> None:
    await denied(lambda: service.list_observations(PATIENT_A, "", 0, ""), CLINICIAN_B)
    await denied(lambda: service.list_observations(f"{ORG_A}/patients/nobody", "", 0, ""), CLINICIAN_B)


@pytest.mark.parametrize("principal", [PATIENT_USER, user(Role.PATIENT, ORG_B)])
async def test_patients_may_not_read_observations(
    service: ObservationService, seeded: list[Observation], principal: Principal
) -> None:
    for call in (
        lambda: service.list_observations(DEVICE, "", 0, ""),
        lambda: service.list_observations(PATIENT_A, "", 0, ""),
        lambda: service.latest(DEVICE),
        lambda: service.get(seeded[0].name),
        lambda: service.aggregate(DEVICE, ["heart_rate"], T0, NOW, timedelta(minutes=1)),
    ):
        with acting_as(principal), pytest.raises(PermissionDenied):
            await call()


async def test_get(service: ObservationService, seeded: list[Observation]) -> None:
    mine, foreign = seeded[0], seeded[3]

    with acting_as(CLINICIAN_A):
        assert await service.get(mine.name) == mine
    with acting_as(PLATFORM_ADMIN):
        assert await service.get(foreign.name) == foreign
        with pytest.raises(NotFound):
            await service.get(f"{DEVICE}/observations/nothing")
        with pytest.raises(NotFound):  # the id exists, under another device
            await service.get(f"{OTHER_DEVICE}/observations/{mine.id}")
    # Names carry no organization: "not yours" and "none" get the same answer.
    await denied(lambda: service.get(foreign.name), CLINICIAN_A)
    await denied(lambda: service.get(f"{DEVICE}/observations/nothing"), CLINICIAN_A)


# --- reads: filters and paging --------------------------------------------------------------------


async def test_filter_by_metric_time_and_session(service: ObservationService, store: InMemoryObservationStore) -> None:
    assignment = DeviceAssignment(DEVICE, MAKER, ORG_A, PATIENT_A)
    seed(
        store,
        assignment,
        draft("h-0", 0),
        draft("h-60", 60, session="devices/SN-1/sessions/s1"),
        draft("s-60", 60, metric="spo2"),
        draft("h-120", 120, session="devices/SN-1/sessions/s1"),
    )
    since, until = T0 + timedelta(seconds=60), T0 + timedelta(seconds=120)
    cases = {
        'metric = "heart_rate"': ["h-0", "h-60", "h-120"],
        "metric != heart_rate": ["s-60"],
        f'time >= "{since.isoformat()}" AND time < "{until.isoformat()}"': ["h-60", "s-60"],
        'session = "devices/SN-1/sessions/s1"': ["h-60", "h-120"],
        f'metric = "heart_rate" AND time > "{since.isoformat()}"': ["h-120"],
    }

    for filter_text, expected in cases.items():
        with acting_as(CLINICIAN_A):
            page = await service.list_observations(DEVICE, filter_text, 0, "")
        assert ids(page.observations) == expected, filter_text


@pytest.mark.parametrize(
    "filter_text", ['patient = "x"', 'organization = "organizations/b"', "metric = BAD!", "time = x"]
)
async def test_bad_filters_are_invalid(service: ObservationService, filter_text: str) -> None:
    with acting_as(CLINICIAN_A), pytest.raises(InvalidArgument) as caught:
        await service.list_observations(DEVICE, filter_text, 0, "")
    assert caught.value.reason == "INVALID_FILTER"


async def test_paging_has_no_gap_and_no_repeat_at_equal_times(
    service: ObservationService, store: InMemoryObservationStore
) -> None:
    assignment = DeviceAssignment(DEVICE, MAKER, ORG_A, PATIENT_A)
    # 25 observations over 4 distinct times: pages of 3 cut through runs of equal timestamps.
    seed(store, assignment, *[draft(f"m-{i:02}", i % 4) for i in range(25)])
    expected = sorted(store.items.values(), key=lambda o: (o.time, o.id))

    seen: list[Observation] = []
    token = ""
    with acting_as(CLINICIAN_A):
        for _ in range(20):  # 9 pages expected; a cursor that does not advance must not loop forever
            page = await service.list_observations(DEVICE, "", 3, token)
            seen += page.observations
            token = page.next_page_token
            if not token:
                break
            # Something stored meanwhile at an earlier time does not shift the pages already read.
            seed(store, assignment, draft(f"late-{len(seen)}", -1))

    assert [o.id for o in seen] == [o.id for o in expected]


async def test_page_tokens_are_bound_to_the_query(service: ObservationService, seeded: list[Observation]) -> None:
    with acting_as(PLATFORM_ADMIN):
        page = await service.list_observations(DEVICE, "", 1, "")
        assert page.next_page_token
        with pytest.raises(InvalidArgument):
            await service.list_observations(DEVICE, 'metric = "spo2"', 1, page.next_page_token)
        with pytest.raises(InvalidArgument):
            await service.list_observations(OTHER_DEVICE, "", 1, page.next_page_token)
        with pytest.raises(InvalidArgument):
            await service.list_observations(DEVICE, "", 1, "garbage")


# --- aggregation ----------------------------------------------------------------------------------


async def test_aggregate_a_patient(service: ObservationService, store: InMemoryObservationStore) -> None:
    assignment = DeviceAssignment(DEVICE, MAKER, ORG_A, PATIENT_A)
    seed(
        store,
        assignment,
        draft("1", 0, value=60.0),
        draft("2", 30, value=80.0),
        draft("3", 60, value=100.0),
        draft("4", 10, metric="spo2", value=97.0),
        replace(draft("5", 20), numeric_value=None, string_value="ok"),  # not numeric: not counted
    )
    seed(store, DeviceAssignment(OTHER_DEVICE, MAKER, ORG_B), draft("other", 0, value=1000.0))

    with acting_as(CLINICIAN_A):
        bins = await service.aggregate(
            PATIENT_A, ["heart_rate", "spo2"], T0, T0 + timedelta(minutes=2), timedelta(minutes=1)
        )

    assert [(b.start_time, b.metric, b.count, b.min, b.max, b.mean, b.standard_deviation) for b in bins] == [
        (T0, "heart_rate", 2, 60.0, 80.0, 70.0, 10.0),
        (T0, "spo2", 1, 97.0, 97.0, 97.0, 0.0),
        (T0 + timedelta(minutes=1), "heart_rate", 1, 100.0, 100.0, 100.0, 0.0),
    ]


async def test_aggregate_a_device_is_scoped_to_the_callers_organization(
    service: ObservationService, seeded: list[Observation]
) -> None:
    window = (T0, T0 + timedelta(minutes=1), timedelta(minutes=1))
    with acting_as(CLINICIAN_A):
        mine = await service.aggregate(DEVICE, ["heart_rate"], *window)
    with acting_as(PLATFORM_ADMIN):
        every = await service.aggregate(DEVICE, ["heart_rate"], *window)

    assert [b.count for b in mine] == [1]  # a-1
    assert [b.count for b in every] == [2]  # a-1 and b-old


async def test_aggregation_reads_a_bounded_number_of_values(
    service: ObservationService, store: InMemoryObservationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.observation.service.MAX_AGGREGATED_VALUES", 3)
    seed(store, DeviceAssignment(DEVICE, MAKER, ORG_A, PATIENT_A), *[draft(f"m-{i}", i) for i in range(4)])

    with acting_as(CLINICIAN_A), pytest.raises(InvalidArgument) as caught:
        await service.aggregate(DEVICE, ["heart_rate"], T0, NOW, timedelta(minutes=1))
    assert caught.value.reason == "TOO_MANY_VALUES"

    with acting_as(CLINICIAN_A):
        bins = await service.aggregate(DEVICE, ["heart_rate"], T0, T0 + timedelta(seconds=3), timedelta(minutes=1))
    assert [b.count for b in bins] == [3]


async def test_aggregation_access_is_checked_before_the_request(service: ObservationService) -> None:
    # A bad request from someone who may not ask at all is denied, not told what is wrong with it.
    await denied(lambda: service.aggregate(PATIENT_A, [], None, None, None), CLINICIAN_B)


# --- latest ---------------------------------------------------------------------------------------


async def test_latest_per_metric(service: ObservationService, store: InMemoryObservationStore) -> None:
    in_a = DeviceAssignment(DEVICE, MAKER, ORG_A, PATIENT_A)
    seed(
        store,
        in_a,
        draft("h-late", 50, value=75.0),
        draft("h-early", 10, value=70.0),  # arrived after h-late, measured before it
        draft("s-1", 20, metric="spo2", value=97.0),
    )
    seed(store, DeviceAssignment(DEVICE, MAKER, ORG_B), draft("b-newest", 90, value=60.0))

    with acting_as(OPERATOR_A):
        mine = await service.latest(DEVICE)
    with acting_as(PLATFORM_ADMIN):
        every = await service.latest(DEVICE)
    with acting_as(CLINICIAN_B):
        theirs = await service.latest(DEVICE)

    assert ids(mine) == ["h-late", "s-1"]  # by metric name
    assert ids(every) == ["b-newest", "s-1"]
    assert ids(theirs) == ["b-newest"]
