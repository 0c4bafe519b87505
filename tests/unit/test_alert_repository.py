"""The alert repositories' document mapping (the MongoDB round trip itself is the shared MongoRepository's)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from pymongo.errors import DuplicateKeyError

from services.alert.domain import Alert, AlertRule, AlertState, Operator, RuleState, Severity
from services.alert.repository import AlertRepository, AlertRuleRepository, RuleStateRepository

AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
RULE_NAME = "organizations/a/alertRules/r1"
ALERT = Alert(
    id="0190a1b2c3d4e5f6a7b8c9d0",
    organization="organizations/a",
    device="devices/SN-1",
    patient="organizations/a/patients/p1",
    severity=Severity.CRITICAL,
    state=AlertState.ACTIVE,
    title="Tachycardia",
    description="heart_rate of devices/SN-1 was 128",
    metric="heart_rate",
    rule=RULE_NAME,
    raise_time=AT,
)
RULE = AlertRule(
    id="r1",
    organization="organizations/a",
    display_name="Tachycardia",
    metric="heart_rate",
    operator=Operator.GREATER_THAN_OR_EQUAL,
    threshold=120.5,
    duration=timedelta(seconds=30, milliseconds=250),
    severity=Severity.MAJOR,
    device="",
    enabled=True,
    clear_automatically=False,
    create_time=AT,
    update_time=AT,
    revision=3,
)

# The mapping needs no database; the repositories only look their collection up.
_DATABASE = cast(Any, {"alerts": None, "alert_rules": None, "rule_states": None})


def test_alert_document_shape() -> None:
    document = AlertRepository(_DATABASE).to_document(ALERT)

    assert document == {
        "_id": ALERT.id,
        "organization": "organizations/a",
        "device": "devices/SN-1",
        "patient": "organizations/a/patients/p1",
        "severity": "CRITICAL",
        "state": "ACTIVE",
        "title": "Tachycardia",
        "description": "heart_rate of devices/SN-1 was 128",
        "metric": "heart_rate",
        "rule": RULE_NAME,
        "raise_time": AT,
        "clear_time": None,
        "cleared_by": "",
        "clear_note": "",
        # The unique index that keeps one active alert per rule and device.
        "active_key": f"{RULE_NAME}|devices/SN-1",
        "revision": 1,
    }


def test_a_cleared_alert_gives_its_key_back() -> None:
    cleared = ALERT.cleared("rule:r1", "back to 90", AT)

    assert AlertRepository(_DATABASE).to_document(cleared)["active_key"] == ALERT.id


@pytest.mark.parametrize(
    "alert",
    [ALERT, ALERT.cleared("organizations/a/users/u", "ok", AT), replace(ALERT, rule="", metric="", device="")],
)
def test_alert_round_trip(alert: Alert) -> None:
    repository = AlertRepository(_DATABASE)
    assert repository.from_document(repository.to_document(alert)) == alert


def test_rule_document_shape_and_round_trip() -> None:
    repository = AlertRuleRepository(_DATABASE)
    document = repository.to_document(RULE)

    assert (document["operator"], document["duration_ms"], document["severity"]) == (
        "GREATER_THAN_OR_EQUAL",
        30250,
        "MAJOR",
    )
    assert (document["enabled"], document["clear_automatically"], document["threshold"]) == (True, False, 120.5)
    assert repository.from_document(document) == RULE


@pytest.mark.parametrize("operator", list(Operator))
def test_every_operator_round_trips(operator: Operator) -> None:
    repository = AlertRuleRepository(_DATABASE)
    rule = replace(RULE, operator=operator)
    assert repository.from_document(repository.to_document(rule)) == rule


@pytest.mark.parametrize(
    "state",
    [
        RuleState(RULE_NAME, "devices/SN-1", "organizations/a"),
        RuleState(RULE_NAME, "devices/SN-1", "organizations/a", AT, AT + timedelta(seconds=31), "a1"),
    ],
)
def test_rule_state_round_trip(state: RuleState) -> None:
    repository = RuleStateRepository(_DATABASE)
    document = repository.to_document(state)

    assert document["_id"] == f"{RULE_NAME}|devices/SN-1"
    assert repository.from_document(document) == state


class RacingCollection:
    """A collection whose first upsert loses an insert race to another instance, as FerretDB answers it."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], bool]] = []

    async def replace_one(self, query: dict[str, Any], document: dict[str, Any], upsert: bool = False) -> None:
        self.calls.append((query, upsert))
        if upsert and len(self.calls) == 1:
            raise DuplicateKeyError("E11000 duplicate key error collection: medmesh_alert.rule_states", 11000)


async def test_a_state_save_that_loses_the_insert_race_replaces() -> None:
    collection = RacingCollection()
    state = RuleState(RULE_NAME, "devices/SN-1", "organizations/a", AT, AT, "a1")

    await RuleStateRepository(cast(Any, {"rule_states": collection})).save(state)

    assert collection.calls == [({"_id": state.id}, True), ({"_id": state.id}, False)]
