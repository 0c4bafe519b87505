"""In-memory fakes of the observation service's ports: store, device directory, alert evaluator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

from medmesh.runtime.errors import Unavailable
from medmesh.runtime.filtering import Condition
from services.observation.alerts import ObservationSample
from services.observation.domain import DeviceAssignment, Observation, ObservationDraft, validate
from services.observation.repository import Cursor


class InMemoryObservationStore:
    """Behaves like `ObservationRepository`: unique (device, message_id), (time, id) keyset order."""

    def __init__(self) -> None:
        self.items: dict[str, Observation] = {}
        self.batches: list[int] = []  # sizes of insert_batch calls
        self.unavailable = False

    async def insert_batch(self, observations: Sequence[Observation]) -> list[bool]:
        if self.unavailable:
            raise Unavailable("database down", reason="DATABASE_UNAVAILABLE")
        self.batches.append(len(observations))
        keys = {(o.device, o.message_id) for o in self.items.values()}
        stored = []
        for observation in observations:
            key = (observation.device, observation.message_id)
            if observation.id in self.items or key in keys:
                stored.append(False)
                continue
            self.items[observation.id] = observation
            keys.add(key)
            stored.append(True)
        return stored

    async def get(self, observation_id: str) -> Observation | None:
        return self.items.get(observation_id)

    def _matching(self, conditions: Sequence[Condition]) -> list[Observation]:
        ordered = sorted(self.items.values(), key=lambda o: (o.time, o.id))
        return [o for o in ordered if all(c.matches(o) for c in conditions)]

    async def list_observations(
        self, conditions: Sequence[Condition], after: Cursor | None, limit: int
    ) -> list[Observation]:
        return [o for o in self._matching(conditions) if after is None or (o.time, o.id) > after][:limit]

    async def numeric_values(
        self, conditions: Sequence[Condition], metrics: Sequence[str], limit: int
    ) -> AsyncIterator[tuple[str, datetime, float]]:
        matching = [o for o in self._matching(conditions) if o.metric in metrics and o.numeric_value is not None]
        for observation in matching[:limit]:
            assert observation.numeric_value is not None
            yield observation.metric, observation.time, observation.numeric_value

    async def latest(self, device: str, organization: str | None) -> list[Observation]:
        newest: dict[tuple[str, str], Observation] = {}
        for o in self.items.values():
            if o.device != device or (organization is not None and o.organization != organization):
                continue
            key = (o.organization, o.metric)
            if key not in newest or (o.time, o.id) > (newest[key].time, newest[key].id):
                newest[key] = o
        return list(newest.values())


class FakeDeviceDirectory:
    def __init__(self, *assignments: DeviceAssignment, unavailable: bool = False) -> None:
        self.assignments = {a.device: a for a in assignments}
        self.unavailable = unavailable
        self.asked: list[str] = []

    async def assignment(self, device: str) -> DeviceAssignment | None:
        self.asked.append(device)
        if self.unavailable:
            # What GrpcDeviceDirectory raises when the registry cannot answer.
            raise Unavailable(f"cannot look up device {device!r}: UNAVAILABLE", reason="DEVICE_SERVICE_UNAVAILABLE")
        return self.assignments.get(device)


class RecordingAlertEvaluator:
    def __init__(self, *, failing: bool = False) -> None:
        self.calls: list[list[ObservationSample]] = []
        self.failing = failing

    async def evaluate(self, samples: Sequence[ObservationSample]) -> None:
        self.calls.append(list(samples))
        if self.failing:
            raise Unavailable("alert evaluation failed: UNAVAILABLE", reason="ALERT_SERVICE_UNAVAILABLE")

    @property
    def samples(self) -> list[ObservationSample]:
        return [s for call in self.calls for s in call]


# --- the fakes hold to the repository's behaviour ---------------------------------------------------


def _observation(message_id: str, seconds: int, device: str = "devices/SN-1") -> Observation:
    at = datetime(2026, 3, 1, tzinfo=UTC)
    draft = ObservationDraft(message_id, "heart_rate", at + timedelta(seconds=seconds), numeric_value=1.0)
    observation = validate(draft, DeviceAssignment(device, "organizations/a"), at + timedelta(hours=1))
    assert isinstance(observation, Observation)
    return observation


async def test_fake_store_stores_each_device_message_once() -> None:
    store = InMemoryObservationStore()
    first, again, other = _observation("m", 0), _observation("m", 5), _observation("m", 0, "devices/SN-2")

    assert await store.insert_batch([first, again, other]) == [True, False, True]
    assert await store.insert_batch([first]) == [False]
    assert len(store.items) == 2


async def test_fake_store_pages_by_time_then_id() -> None:
    store = InMemoryObservationStore()
    observations = [_observation(f"m-{i}", i % 2) for i in range(4)]
    await store.insert_batch(observations)
    ordered = sorted(observations, key=lambda o: (o.time, o.id))

    first = await store.list_observations([], None, 2)
    rest = await store.list_observations([], (first[-1].time, first[-1].id), 10)

    assert first + rest == ordered
