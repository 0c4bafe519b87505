"""The observation repository and the service's queries against a real FerretDB, without the rest of the platform.

This module starts its own FerretDB on free 127.0.0.1 ports and stops it afterwards. It checks
what the unit fakes cannot: that duplicate-key errors of an unordered bulk insert map back to the
right items (also under concurrent senders), that the keyset queries page without gap or repeat on
FerretDB, that the indexes exist, and that aggregation and "latest" give the same answers as the
fakes do. Timings are printed (`pytest -s`) as a rough measure, not asserted.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from medmesh.launcher.config import FERRETDB_BUILD
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as
from medmesh.runtime.directories import DeviceAssignment
from medmesh.runtime.filtering import Comparison, Condition
from medmesh.runtime.mongo import Document
from services.observation.domain import Observation, ObservationDraft, validate
from services.observation.repository import ObservationRepository
from services.observation.service import ObservationService
from tests.integration.stores import ferretdb
from tests.unit.test_observation_fakes import FakeDeviceDirectory, RecordingAlertEvaluator

ORG_A, ORG_B = "organizations/a", "organizations/b"
DEVICE = "devices/SN-1"
PATIENT = f"{ORG_A}/patients/p1"
IN_A = DeviceAssignment(DEVICE, "organizations/maker", ORG_A, PATIENT)
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=1)
CLINICIAN_A = Principal("organizations/a/users/c", ORG_A, Role.CLINICIAN)


@pytest.fixture(scope="module")
def mongodb_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with ferretdb(tmp_path_factory.mktemp("ferretdb-observation")) as uri:
        yield uri


@pytest.fixture
async def database(mongodb_uri: str) -> AsyncIterator[AsyncDatabase[Document]]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(mongodb_uri, tz_aware=True)
    try:
        yield client[f"observation_{uuid.uuid4().hex[:8]}"]
    finally:
        await client.close()


@pytest.fixture
async def repository(database: AsyncDatabase[Document]) -> ObservationRepository:
    repository = ObservationRepository(database)
    await repository.ensure_indexes()
    await repository.ensure_indexes()  # idempotent: readiness runs it on every fresh start
    return repository


def observations(
    count: int, assignment: DeviceAssignment = IN_A, prefix: str = "m", metric: str = "heart_rate", spacing: float = 1
) -> list[Observation]:
    made = []
    for i in range(count):
        draft = ObservationDraft(
            f"{prefix}-{i}", metric, T0 + timedelta(seconds=i * spacing), unit="/min", numeric_value=60.0 + i % 40
        )
        observation = validate(draft, assignment, NOW)
        assert isinstance(observation, Observation)
        made.append(observation)
    return made


async def test_indexes(repository: ObservationRepository, database: AsyncDatabase[Document]) -> None:
    await repository.insert_batch(observations(1, prefix="idx"))
    indexes = {tuple(v["key"]): v.get("unique", False) async for v in _indexes(database)}

    # FerretDB scans for every query but by _id, so no index is made here; on MongoDB the query
    # indexes (device, time), (organization, device, metric, time), (patient, time) come too
    # (create_query_index). Idempotency needs none: `_id` is a hash of (device, message_id).
    assert indexes == {("_id",): False}


async def _indexes(database: AsyncDatabase[Document]) -> AsyncIterator[Document]:
    cursor = await database["observations"].list_indexes()
    async for index in cursor:
        yield dict(index)


async def test_duplicates_map_back_to_their_items(repository: ObservationRepository) -> None:
    first = observations(5)
    assert await repository.insert_batch(first) == [True] * 5

    again = [first[0], *observations(2, prefix="new"), first[3], first[4]]
    assert await repository.insert_batch(again) == [False, True, True, False, False]

    same_twice = observations(1, prefix="twice")
    assert await repository.insert_batch(same_twice + same_twice) == [True, False]


async def test_concurrent_senders_store_each_message_once(repository: ObservationRepository) -> None:
    # The same batch from ten senders at once (say, two adapter instances and retries): the unique
    # insert is the one primitive that is atomic on FerretDB, so each item is stored exactly once.
    batch = observations(50)

    answers = await asyncio.gather(*(repository.insert_batch(batch) for _ in range(10)))

    assert [sum(answer[i] for answer in answers) for i in range(50)] == [1] * 50
    stored = await repository.list_observations([Condition("device", True, DEVICE)], None, 1000)
    assert len(stored) == 50


async def test_keyset_paging_at_equal_times(repository: ObservationRepository) -> None:
    batch = observations(40, spacing=0.25)
    equal = observations(20, prefix="same", spacing=0)  # twenty more at exactly T0, as m-0 is
    await repository.insert_batch(batch + equal)
    scope = [Condition("organization", True, ORG_A), Condition("device", True, DEVICE)]
    expected = sorted(batch + equal, key=lambda o: (o.time, o.id))

    seen: list[Observation] = []
    after = None
    for _ in range(30):
        page = await repository.list_observations(scope, after, 7)
        seen += page
        if len(page) < 7:
            break
        after = (page[-1].time, page[-1].id)

    assert [o.id for o in seen] == [o.id for o in expected]
    assert seen == expected  # and every field survives the round trip


async def test_conditions_select_on_the_database(repository: ObservationRepository) -> None:
    await repository.insert_batch(observations(10) + observations(5, prefix="s", metric="spo2"))
    await repository.insert_batch(observations(3, DeviceAssignment(DEVICE, "organizations/maker", ORG_B), prefix="b"))
    since = Condition("time", True, T0 + timedelta(seconds=2), Comparison.GREATER_OR_EQUAL)
    until = Condition("time", True, T0 + timedelta(seconds=5), Comparison.LESS)

    in_a = await repository.list_observations([Condition("organization", True, ORG_A)], None, 100)
    by_patient = await repository.list_observations([Condition("patient", True, PATIENT), since, until], None, 100)
    spo2 = await repository.list_observations([Condition("metric", True, "spo2")], None, 100)
    everything = await repository.list_observations([Condition("device", True, DEVICE)], None, 100)

    assert len(in_a) == 15
    assert sorted(o.message_id for o in by_patient) == ["m-2", "m-3", "m-4", "s-2", "s-3", "s-4"]
    assert [(o.time, o.id) for o in by_patient] == sorted((o.time, o.id) for o in by_patient)
    assert {o.metric for o in spo2} == {"spo2"}
    assert len(everything) == 18


async def test_latest_per_metric_and_organization(repository: ObservationRepository) -> None:
    await repository.insert_batch(observations(30))
    await repository.insert_batch(observations(3, prefix="s", metric="spo2"))
    await repository.insert_batch(observations(2, DeviceAssignment(DEVICE, "organizations/maker", ORG_B), prefix="b"))

    latest_a = await repository.latest(DEVICE, ORG_A)
    latest_all = await repository.latest(DEVICE, None)

    assert sorted((o.metric, o.message_id) for o in latest_a) == [("heart_rate", "m-29"), ("spo2", "s-2")]
    assert sorted((o.organization, o.metric, o.message_id) for o in latest_all) == [
        (ORG_A, "heart_rate", "m-29"),
        (ORG_A, "spo2", "s-2"),
        (ORG_B, "heart_rate", "b-1"),
    ]


async def test_service_aggregation_on_ferretdb(repository: ObservationRepository) -> None:
    batch = observations(600, spacing=0.5)  # five minutes of a reading every half second
    for start in range(0, 600, 500):
        await repository.insert_batch(batch[start : start + 500])
    service = ObservationService(
        repository, FakeDeviceDirectory(IN_A), RecordingAlertEvaluator(), RecordingAuditTrail(), clock=lambda: NOW
    )

    with acting_as(CLINICIAN_A):
        bins = await service.aggregate(PATIENT, ["heart_rate"], T0, T0 + timedelta(minutes=5), timedelta(minutes=1))

    assert [b.count for b in bins] == [120] * 5
    for index, cell in enumerate(bins):
        values = [o.numeric_value or 0.0 for o in batch[index * 120 : (index + 1) * 120]]
        assert cell.start_time == T0 + timedelta(minutes=index)
        assert (cell.min, cell.max) == (min(values), max(values))
        assert cell.mean == pytest.approx(statistics.fmean(values))
        assert cell.standard_deviation == pytest.approx(statistics.pstdev(values))


async def test_measure(repository: ObservationRepository) -> None:
    """Rough timings on FerretDB/SQLite (printed): ingest of full batches, a page, an aggregation, latest."""
    batches = [observations(500, prefix=f"b{n}", spacing=0.01) for n in range(10)]
    started = time.perf_counter()
    for batch in batches:
        await repository.insert_batch(batch)
    ingest = time.perf_counter() - started

    started = time.perf_counter()
    resent = await repository.insert_batch(batches[0])
    duplicate_batch = time.perf_counter() - started
    assert not any(resent)

    scope = [Condition("organization", True, ORG_A), Condition("device", True, DEVICE)]
    started = time.perf_counter()
    page = await repository.list_observations(scope, None, 1000)
    listing = time.perf_counter() - started
    assert len(page) == 1000

    service = ObservationService(
        repository, FakeDeviceDirectory(IN_A), RecordingAlertEvaluator(), RecordingAuditTrail(), clock=lambda: NOW
    )
    started = time.perf_counter()
    with acting_as(CLINICIAN_A):
        bins = await service.aggregate(DEVICE, ["heart_rate"], T0, T0 + timedelta(hours=1), timedelta(seconds=10))
    aggregation = time.perf_counter() - started
    assert sum(b.count for b in bins) == 5000

    started = time.perf_counter()
    latest = await repository.latest(DEVICE, ORG_A)
    latest_time = time.perf_counter() - started
    assert len(latest) == 1

    print(
        f"\nFerretDB {FERRETDB_BUILD}/SQLite: 10 x 500 observations stored in {ingest:.2f}s"
        f" ({5000 / ingest:.0f}/s); a resent batch of 500 (all duplicates) {duplicate_batch * 1000:.0f} ms;"
        f" a page of 1000 {listing * 1000:.0f} ms; aggregation over 5000 values {aggregation * 1000:.0f} ms;"
        f" latest {latest_time * 1000:.1f} ms"
    )
