"""ObservationRepository without a database: the document shape, and how bulk-insert errors map to items.

The same code against a real FerretDB is in tests/integration/test_observation_store.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from pymongo.errors import BulkWriteError

from medmesh.runtime.mongo import Document
from services.observation.domain import Observation, Waveform, observation_id
from services.observation.repository import ObservationRepository, series_key

AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
DEVICE = "devices/SN-1"


def an_observation(message_id: str = "m-1", **changes: Any) -> Observation:
    observation = Observation(
        id=observation_id(DEVICE, message_id),
        device=DEVICE,
        message_id=message_id,
        metric="heart_rate",
        time=AT,
        organization="organizations/a",
        patient="organizations/a/patients/p1",
        receive_time=AT,
        unit="/min",
        numeric_value=72.5,
    )
    return replace(observation, **changes)


class FakeCollection:
    """Answers `insert_many` as MongoDB does: unordered, a BulkWriteError listing failed items by index."""

    def __init__(self, errors: Sequence[tuple[int, int]] = ()) -> None:
        self.errors = list(errors)  # (index, code)
        self.inserted: list[list[Document]] = []

    async def insert_many(self, documents: list[Document], ordered: bool = True) -> None:
        assert ordered is False  # one bad item must not stop the ones after it
        self.inserted.append(documents)
        if self.errors:
            write_errors = [{"index": i, "code": c, "errmsg": "E11000 duplicate key"} for i, c in self.errors]
            raise BulkWriteError(
                {"writeErrors": write_errors, "writeConcernErrors": [], "nInserted": len(documents) - len(write_errors)}
            )


def repository(observations: FakeCollection, series: FakeCollection | None = None) -> ObservationRepository:
    database = {"observations": observations, "series": series or FakeCollection()}
    return ObservationRepository(cast(Any, database))


def test_document_shape() -> None:
    assert ObservationRepository.to_document(an_observation(session="devices/SN-1/sessions/s1")) == {
        "_id": observation_id(DEVICE, "m-1"),
        "device": DEVICE,
        "message_id": "m-1",
        "metric": "heart_rate",
        "time": AT,
        "organization": "organizations/a",
        "patient": "organizations/a/patients/p1",
        "receive_time": AT,
        "unit": "/min",
        "session": "devices/SN-1/sessions/s1",
        "numeric_value": 72.5,  # only the value that is set: `$exists` tells numbers apart
    }


@pytest.mark.parametrize(
    "observation",
    [
        an_observation(),
        an_observation(numeric_value=None, boolean_value=False, unit="", patient=""),
        an_observation(numeric_value=None, string_value=""),
        an_observation(numeric_value=None, waveform=Waveform(250.0, (0.5, -1.0, 2.0), AT)),
        an_observation(numeric_value=None, waveform=Waveform(250.0, (0.5,), None)),
        an_observation(numeric_value=0.0, session="s"),
    ],
)
def test_round_trip(observation: Observation) -> None:
    assert ObservationRepository.from_document(ObservationRepository.to_document(observation)) == observation


async def test_duplicate_key_errors_mark_exactly_their_items() -> None:
    observations = FakeCollection(errors=[(1, 11000), (3, 11000)])
    batch = [an_observation(f"m-{i}") for i in range(5)]

    stored = await repository(observations).insert_batch(batch)

    assert stored == [True, False, True, False, True]
    assert [d["message_id"] for d in observations.inserted[0]] == [f"m-{i}" for i in range(5)]


async def test_any_other_write_error_fails_the_batch() -> None:
    observations = FakeCollection(errors=[(0, 11000), (1, 121)])  # 121: document validation failure

    with pytest.raises(BulkWriteError):
        await repository(observations).insert_batch([an_observation("m-0"), an_observation("m-1")])


async def test_each_series_is_registered_once_per_process() -> None:
    series = FakeCollection()
    store = repository(FakeCollection(), series)

    await store.insert_batch([an_observation("m-1"), an_observation("m-2"), an_observation("m-3", metric="spo2")])
    await store.insert_batch([an_observation("m-4"), an_observation("m-5", metric="spo2")])
    await store.insert_batch([an_observation("m-6", organization="organizations/b")])

    assert [[d["_id"] for d in call] for call in series.inserted] == [
        [
            series_key("organizations/a", DEVICE, "heart_rate"),
            series_key("organizations/a", DEVICE, "spo2"),
        ],
        [series_key("organizations/b", DEVICE, "heart_rate")],
    ]


async def test_series_registered_by_another_instance_are_fine() -> None:
    series = FakeCollection(errors=[(0, 11000)])
    observations = FakeCollection()

    assert await repository(observations, series).insert_batch([an_observation()]) == [True]
    assert len(observations.inserted) == 1


async def test_series_are_registered_before_observations_are_stored() -> None:
    # If registering fails, nothing is stored: the retried batch registers them, none is left unlisted.
    series = FakeCollection(errors=[(0, 121)])
    observations = FakeCollection()

    with pytest.raises(BulkWriteError):
        await repository(observations, series).insert_batch([an_observation()])
    assert observations.inserted == []


async def test_an_empty_batch_writes_nothing() -> None:
    observations, series = FakeCollection(), FakeCollection()

    assert await repository(observations, series).insert_batch([]) == []
    assert observations.inserted == series.inserted == []
