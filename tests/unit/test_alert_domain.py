"""Alert domain rules: names, validation, and rule evaluation as pure functions (`step`). No I/O."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from medmesh.alert.v1 import alert_service_pb2 as pb
from medmesh.runtime.errors import InvalidArgument
from services.alert.domain import (
    RULE_UPDATABLE_FIELDS,
    Action,
    Alert,
    AlertDetails,
    AlertRule,
    AlertState,
    DeviceAssignment,
    Operator,
    RuleDetails,
    RuleState,
    Sample,
    Severity,
    episode_closed,
    new_alert,
    new_id,
    new_rule,
    parse_alert_name,
    parse_parent,
    parse_rule_name,
    raised_alert,
    require_sample,
    rule_key,
    samples_by_device,
    step,
)

ORG = "organizations/clinic-1"
DEVICE = "devices/SN-1"
PATIENT = f"{ORG}/patients/p1"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HEART_RATE_OVER_120_FOR_30S = RuleDetails(
    metric="heart_rate",
    operator=Operator.GREATER_THAN,
    threshold=120,
    duration=timedelta(seconds=30),
    severity=Severity.CRITICAL,
)


def a_rule(details: RuleDetails = HEART_RATE_OVER_120_FOR_30S, **changes: object) -> AlertRule:
    return new_rule(ORG, dataclasses.replace(details, **changes), T0, "r1")  # type: ignore[arg-type]


def sample(seconds: float, value: float, metric: str = "heart_rate", device: str = DEVICE) -> Sample:
    return Sample(device, ORG, PATIENT, metric, value, T0 + timedelta(seconds=seconds))


def run(rule: AlertRule, samples: list[Sample], state: RuleState | None = None) -> tuple[RuleState, list[Action]]:
    """Steps through samples, playing the service: a RAISE sets an active alert, a CLEAR drops it."""
    state = state or RuleState(rule.name, DEVICE, ORG)
    actions = []
    for s in samples:
        state, action = step(rule, state, s)
        if action is Action.RAISE:
            state = dataclasses.replace(state, active_alert="alert-1")
        elif action is Action.CLEAR:
            state = dataclasses.replace(state, active_alert="")
        actions.append(action)
    return state, actions


def violation(error: InvalidArgument) -> str:
    assert len(error.field_violations) == 1, error.field_violations
    return error.field_violations[0].field


# --- the example of the issue ---------------------------------------------------------------------


def test_heart_rate_over_120_for_30_seconds() -> None:
    rule = a_rule()
    state = RuleState(rule.name, DEVICE, ORG)
    expected = [(0, 130, Action.NONE), (10, 135, Action.NONE), (20, 140, Action.NONE), (31, 128, Action.RAISE)]

    for seconds, value, action in expected:
        state, got = step(rule, state, sample(seconds, value))
        assert got is action, (seconds, value)
        assert state.violating_since == T0
    state = dataclasses.replace(state, active_alert="a1")

    state, got = step(rule, state, sample(40, 90))

    assert got is Action.CLEAR
    assert state.violating_since is None
    assert state.last_time == T0 + timedelta(seconds=40)


def test_exactly_the_duration_is_enough() -> None:
    _, actions = run(a_rule(), [sample(0, 130), sample(30, 130)])

    assert actions == [Action.NONE, Action.RAISE]


def test_a_break_restarts_the_window() -> None:
    _, actions = run(a_rule(), [sample(0, 130), sample(20, 100), sample(25, 130), sample(50, 130), sample(55, 130)])

    assert actions == [Action.NONE, Action.NONE, Action.NONE, Action.NONE, Action.RAISE]


def test_zero_duration_raises_on_the_first_violating_sample() -> None:
    _, actions = run(a_rule(duration=timedelta(0)), [sample(0, 100), sample(1, 121), sample(2, 125)])

    assert actions == [Action.NONE, Action.RAISE, Action.NONE]  # one alert, not one per sample


def test_no_second_raise_while_an_alert_is_active() -> None:
    state, actions = run(a_rule(), [sample(0, 130), sample(30, 130), sample(60, 130), sample(90, 130)])

    assert actions == [Action.NONE, Action.RAISE, Action.NONE, Action.NONE]
    assert state.active_alert == "alert-1"


def test_without_automatic_clear_the_alert_stays_and_no_second_one_is_raised() -> None:
    rule = a_rule(clear_automatically=False)

    state, actions = run(rule, [sample(0, 130), sample(30, 130), sample(40, 90), sample(50, 130), sample(90, 130)])

    assert actions == [Action.NONE, Action.RAISE, Action.NONE, Action.NONE, Action.NONE]
    assert state.active_alert == "alert-1"
    assert state.violating_since == T0 + timedelta(seconds=50)


def test_a_non_violating_sample_without_an_alert_just_resets() -> None:
    state, actions = run(a_rule(), [sample(0, 130), sample(10, 90)])

    assert actions == [Action.NONE, Action.NONE]
    assert state.violating_since is None


def test_a_sample_older_than_the_last_evaluated_is_ignored() -> None:
    rule = a_rule()
    state, _ = run(rule, [sample(0, 130), sample(20, 130)])

    later, action = step(rule, state, sample(10, 90))  # would reset the window if it counted

    assert (later, action) == (state, Action.NONE)


def test_a_sample_at_the_last_evaluated_time_counts_again() -> None:
    """A repeated batch re-evaluates its newest sample; that must not raise twice or clear."""
    rule = a_rule()
    state, _ = run(rule, [sample(0, 130), sample(30, 130)])

    again, action = step(rule, state, sample(30, 130))

    assert (again, action) == (state, Action.NONE)


def test_a_closed_episode_restarts_the_window() -> None:
    rule = a_rule()
    state, _ = run(rule, [sample(0, 130), sample(30, 130)])

    state = episode_closed(state)
    _, actions = run(rule, [sample(40, 130), sample(60, 130), sample(70, 130)], state)

    assert actions == [Action.NONE, Action.NONE, Action.RAISE]


@pytest.mark.parametrize(
    ("operator", "holds_below", "holds_at", "holds_above"),
    [
        (Operator.GREATER_THAN, False, False, True),
        (Operator.GREATER_THAN_OR_EQUAL, False, True, True),
        (Operator.LESS_THAN, True, False, False),
        (Operator.LESS_THAN_OR_EQUAL, True, True, False),
        (Operator.EQUAL, False, True, False),
        (Operator.NOT_EQUAL, True, False, True),
    ],
)
def test_operators(operator: Operator, holds_below: bool, holds_at: bool, holds_above: bool) -> None:
    assert (operator.holds(119.5, 120), operator.holds(120, 120), operator.holds(120.5, 120)) == (
        holds_below,
        holds_at,
        holds_above,
    )


# --- batches --------------------------------------------------------------------------------------


def test_samples_are_grouped_per_device_in_time_order() -> None:
    other = sample(5, 1, device="devices/SN-2")
    groups = samples_by_device([sample(20, 3), other, sample(0, 1), sample(10, 2)])

    assert groups == [
        ((ORG, DEVICE), [sample(0, 1), sample(10, 2), sample(20, 3)]),
        ((ORG, "devices/SN-2"), [other]),
    ]


def test_samples_that_are_not_finite_are_dropped() -> None:
    groups = samples_by_device([sample(0, float("nan")), sample(1, float("inf")), sample(2, 1)])

    assert groups == [((ORG, DEVICE), [sample(2, 1)])]


def test_require_sample_keeps_milliseconds_and_checks_names() -> None:
    precise = dataclasses.replace(sample(0, 1), time=T0 + timedelta(microseconds=1_234_567))

    assert require_sample(precise, "samples[0]").time == T0 + timedelta(seconds=1, milliseconds=234)
    with pytest.raises(InvalidArgument) as caught:
        require_sample(dataclasses.replace(precise, device="SN-1"), "samples[3]")
    assert violation(caught.value) == "samples[3].device"


# --- alerts ---------------------------------------------------------------------------------------


def test_raised_alert() -> None:
    rule = a_rule(display_name="")
    alert = raised_alert(rule, sample(31, 128), "a1")

    assert alert.name == f"{ORG}/alerts/a1"
    assert (alert.device, alert.patient, alert.metric, alert.rule) == (DEVICE, PATIENT, "heart_rate", rule.name)
    assert (alert.severity, alert.state, alert.raise_time) == (Severity.CRITICAL, AlertState.ACTIVE, sample(31, 0).time)
    assert alert.title == "heart_rate > 120"
    assert "128" in alert.description
    assert "30s" in alert.description
    assert alert.active_key == rule_key(rule.name, DEVICE)


def test_the_rule_display_name_is_the_title() -> None:
    assert raised_alert(a_rule(display_name="Tachycardia"), sample(0, 130)).title == "Tachycardia"


def test_active_key_is_the_id_unless_a_rule_alert_is_active() -> None:
    alert = raised_alert(a_rule(), sample(31, 128), "a1")
    by_hand = dataclasses.replace(alert, rule="")

    assert alert.cleared("rule:r1", "", T0).active_key == "a1"
    assert by_hand.active_key == "a1"


def test_cleared() -> None:
    alert = raised_alert(a_rule(), sample(31, 128), "a1")

    cleared = alert.cleared("organizations/clinic-1/users/u", "  seen, repositioned sensor ", T0)

    assert (cleared.state, cleared.clear_time, cleared.revision) == (AlertState.CLEARED, T0, 2)
    assert (cleared.cleared_by, cleared.clear_note) == ("organizations/clinic-1/users/u", "seen, repositioned sensor")
    with pytest.raises(InvalidArgument):
        alert.cleared("x", "n" * 1001, T0)


def test_new_alert_by_hand() -> None:
    details = AlertDetails(device=DEVICE, patient=PATIENT, severity=Severity.MINOR, title=" Sensor loose ")

    alert = new_alert(ORG, details, T0, "a1")

    assert alert == Alert(
        id="a1",
        organization=ORG,
        device=DEVICE,
        patient=PATIENT,
        severity=Severity.MINOR,
        state=AlertState.ACTIVE,
        title="Sensor loose",
        description="",
        metric="",
        rule="",
        raise_time=T0,
    )


@pytest.mark.parametrize(
    ("details", "field"),
    [
        (AlertDetails(severity=Severity.INFO, title="x"), "alert.device"),
        (AlertDetails(device="SN-1", severity=Severity.INFO, title="x"), "alert.device"),
        (AlertDetails(patient="organizations/other/patients/p1", severity=Severity.INFO, title="x"), "alert.patient"),
        (AlertDetails(patient="p1", severity=Severity.INFO, title="x"), "alert.patient"),
        (AlertDetails(device=DEVICE, title="x"), "alert.severity"),
        (AlertDetails(device=DEVICE, severity=Severity.INFO, title="  "), "alert.title"),
        (AlertDetails(device=DEVICE, severity=Severity.INFO, title="x" * 201), "alert.title"),
        (AlertDetails(device=DEVICE, severity=Severity.INFO, title="x", description="d" * 2001), "alert.description"),
    ],
)
def test_new_alert_rejects(details: AlertDetails, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        new_alert(ORG, details, T0)

    assert violation(caught.value) == field


def test_new_ids_sort_by_time_and_are_names() -> None:
    first = new_id()
    second = new_id()

    assert len(first) == 24
    assert parse_alert_name(f"{ORG}/alerts/{first}") == (ORG, first)
    assert first[:12] <= second[:12]


def test_device_assignment_data_organization() -> None:
    assert DeviceAssignment(DEVICE, "organizations/maker", "", "").data_organization == "organizations/maker"
    assert DeviceAssignment(DEVICE, "organizations/maker", ORG, PATIENT).data_organization == ORG


# --- rules ----------------------------------------------------------------------------------------


def test_new_rule_defaults() -> None:
    rule = a_rule()

    assert rule.name == f"{ORG}/alertRules/r1"
    assert (rule.enabled, rule.clear_automatically, rule.device, rule.revision) == (True, True, "", 1)
    assert rule.condition == "heart_rate > 120"
    assert rule.watches(DEVICE)
    assert not dataclasses.replace(rule, enabled=False).watches(DEVICE)
    assert not a_rule(device="devices/SN-2").watches(DEVICE)


def test_rule_duration_is_kept_to_milliseconds() -> None:
    assert a_rule(duration=timedelta(seconds=1, microseconds=1500)).duration == timedelta(seconds=1, milliseconds=1)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"metric": ""}, "alert_rule.metric"),
        ({"metric": "heart rate"}, "alert_rule.metric"),
        ({"operator": None}, "alert_rule.operator"),
        ({"threshold": float("nan")}, "alert_rule.threshold"),
        ({"duration": timedelta(seconds=-1)}, "alert_rule.duration"),
        ({"duration": timedelta(days=1, seconds=1)}, "alert_rule.duration"),
        ({"severity": None}, "alert_rule.severity"),
        ({"device": "SN-1"}, "alert_rule.device"),
        ({"display_name": "x" * 201}, "alert_rule.display_name"),
    ],
)
def test_new_rule_rejects(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        a_rule(**changes)

    assert violation(caught.value) == field


def test_rule_update_applies_only_the_masked_fields_and_validates_the_result() -> None:
    rule = a_rule()
    changes = RuleDetails(threshold=130, enabled=False, metric="")  # metric is not in the mask
    later = T0 + timedelta(minutes=1)

    updated = rule.updated(changes, {"threshold", "enabled", "clear_automatically"}, later)

    assert (updated.threshold, updated.enabled, updated.clear_automatically) == (130, False, True)
    assert (updated.metric, updated.create_time, updated.update_time, updated.revision) == ("heart_rate", T0, later, 2)
    with pytest.raises(InvalidArgument) as caught:
        rule.updated(changes, {"metric"}, later)
    assert violation(caught.value) == "alert_rule.metric"


def test_updatable_fields_are_the_protos_writable_fields() -> None:
    writable = {f.name for f in pb.AlertRule.DESCRIPTOR.fields} - {"name", "create_time", "update_time", "etag"}
    assert set(RULE_UPDATABLE_FIELDS) == writable


# --- names ----------------------------------------------------------------------------------------


def test_names() -> None:
    assert parse_parent(ORG) == ORG
    assert parse_parent("organizations/-", allow_all=True) == "organizations/-"
    assert parse_rule_name(f"{ORG}/alertRules/r1") == (ORG, "r1")
    assert parse_alert_name(f"{ORG}/alerts/a1") == (ORG, "a1")


@pytest.mark.parametrize(
    "name",
    ["organizations/-/alerts/a1", "organizations/o/alerts/", "organizations/O/alerts/a1", "o/alerts/a1", "x"],
)
def test_bad_alert_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_alert_name(name)
    assert caught.value.reason == "INVALID_NAME"


def test_the_wildcard_parent_only_where_allowed() -> None:
    with pytest.raises(InvalidArgument):
        parse_parent("organizations/-")
