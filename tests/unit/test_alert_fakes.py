"""In-memory fakes of the alert service's ports, shared by the test_alert_* files, and the tests that
hold them to the repositories' behaviour (newest first, one active alert per rule and device)."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from medmesh.runtime.errors import AlreadyExists, Unavailable
from medmesh.runtime.filtering import Condition
from services.alert.domain import Alert, AlertState, DeviceAssignment, RuleState, Severity
from tests.unit.fakes import InMemoryRepository


class FakeAlertStore(InMemoryRepository[Alert]):
    """`AlertRepository` in memory: newest first, and the unique `active_key` index."""

    def __init__(self) -> None:
        super().__init__("alert")
        self.inserts = 0

    async def insert(self, resource: Alert) -> None:
        await asyncio.sleep(0)  # lets concurrent evaluations interleave, as database round trips do
        if any(a.active_key == resource.active_key for a in self.items.values()):
            raise AlreadyExists(f"alert {resource.id!r} already exists", reason="ALERT_ALREADY_EXISTS")
        await super().insert(resource)
        self.inserts += 1

    async def list(self, conditions: Sequence[Condition], after: str | None, limit: int) -> list[Alert]:
        matching = [
            item
            for key, item in sorted(self.items.items(), reverse=True)
            if (after is None or key < after) and all(c.matches(item) for c in conditions)
        ]
        return matching[: abs(limit)] if limit else matching

    async def find_active(self, active_key: str) -> Alert | None:
        return next((a for a in self.items.values() if a.active_key == active_key), None)

    def active(self) -> builtins.list[Alert]:
        return [a for a in self.items.values() if a.state is AlertState.ACTIVE]


class FakeRuleStates:
    """`RuleStateRepository` in memory; counts reads and writes, to keep ingest cheap."""

    def __init__(self) -> None:
        self.items: dict[str, RuleState] = {}
        self.reads = 0
        self.writes = 0

    async def get(self, state_id: str) -> RuleState | None:
        await asyncio.sleep(0)  # lets concurrent evaluations interleave, as database round trips do
        self.reads += 1
        return self.items.get(state_id)

    async def save(self, state: RuleState) -> None:
        self.writes += 1
        self.items[state.id] = state

    async def delete_for_rule(self, rule: str) -> None:
        self.items = {key: state for key, state in self.items.items() if state.rule != rule}


class FakeDeviceDirectory:
    """The device service's `GetDeviceAssignment`: a dict of assignments."""

    def __init__(self, *assignments: DeviceAssignment, unavailable: bool = False) -> None:
        self.assignments = {a.device: a for a in assignments}
        self.unavailable = unavailable
        self.asked: list[str] = []

    async def assignment(self, device: str) -> DeviceAssignment | None:
        self.asked.append(device)
        if self.unavailable:
            raise Unavailable(f"cannot look up device {device!r}: UNAVAILABLE", reason="DEVICE_SERVICE_UNAVAILABLE")
        return self.assignments.get(device)


AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def an_alert(alert_id: str, **changes: object) -> Alert:
    alert = Alert(
        id=alert_id,
        organization="organizations/a",
        device="devices/SN-1",
        patient="",
        severity=Severity.MAJOR,
        state=AlertState.ACTIVE,
        title="t",
        description="",
        metric="heart_rate",
        rule="organizations/a/alertRules/r1",
        raise_time=AT,
    )
    return replace(alert, **changes)  # type: ignore[arg-type]


async def test_fake_alert_store_keeps_one_active_alert_per_rule_and_device() -> None:
    store = FakeAlertStore()
    await store.insert(an_alert("a1"))

    with pytest.raises(AlreadyExists):
        await store.insert(an_alert("a2"))
    await store.insert(an_alert("a3", device="devices/SN-2"))
    await store.insert(an_alert("a4", state=AlertState.CLEARED))
    await store.insert(an_alert("a5", rule=""))  # by hand: never in the way of a rule's alert

    assert sorted(store.items) == ["a1", "a3", "a4", "a5"]
    assert await store.find_active("organizations/a/alertRules/r1|devices/SN-1") == store.items["a1"]


async def test_fake_alert_store_lists_newest_first() -> None:
    store = FakeAlertStore()
    for alert_id in ("a1", "a3", "a2"):
        await store.insert(an_alert(alert_id, rule=""))

    assert [a.id for a in await store.list([], None, 2)] == ["a3", "a2"]
    assert [a.id for a in await store.list([], "a2", 2)] == ["a1"]
