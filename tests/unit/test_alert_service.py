"""AlertService and AlertRuleService against in-memory fakes: access per role (PERMISSION_DENIED before
NOT_FOUND), tenancy of lists, the device check, clearing, rule CRUD, and one audit event per change."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from medmesh.runtime.audit import AuditEvent, RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as
from medmesh.runtime.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.alert.domain import (
    Alert,
    AlertDetails,
    AlertRule,
    AlertState,
    DeviceAssignment,
    Operator,
    RuleDetails,
    RuleState,
    Severity,
    new_rule,
)
from services.alert.evaluation import MAX_RULES_PER_ORGANIZATION, RuleCache
from services.alert.service import AlertRuleService, AlertService
from tests.unit.fakes import InMemoryRepository
from tests.unit.test_alert_fakes import FakeAlertStore, FakeDeviceDirectory, FakeRuleStates

ORG_A = "organizations/a"
ORG_B = "organizations/b"
MAKER = "organizations/manufacturer"
DEVICE = "devices/SN-1"  # made by the manufacturer, cared for by A, assigned to patient p1
FREE_DEVICE = "devices/SN-2"  # cared for by A, no patient
B_DEVICE = "devices/SN-3"  # cared for by B
MAKER_DEVICE = "devices/SN-4"  # not assigned to a care organization
PATIENT_A1 = f"{ORG_A}/patients/p1"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def user(role: Role, organization: str = ORG_A, patient: str = "") -> Principal:
    return Principal(f"{organization}/users/{role.value}", organization, role, patient=patient)


PLATFORM_ADMIN = user(Role.PLATFORM_ADMIN, MAKER)
ADMIN_A, ADMIN_B = user(Role.ORGANIZATION_ADMIN), user(Role.ORGANIZATION_ADMIN, ORG_B)
CLINICIAN_A, CLINICIAN_B = user(Role.CLINICIAN), user(Role.CLINICIAN, ORG_B)
OPERATOR_A = user(Role.OPERATOR)
PATIENT = user(Role.PATIENT, patient=PATIENT_A1)

ORG_DENIED = "ORGANIZATION_ACCESS_DENIED"
ROLE_DENIED = "ROLE_NOT_ALLOWED"
OK = "ok"

DEVICE_ALERT = AlertDetails(device=DEVICE, severity=Severity.MAJOR, title="Sensor detached")
HEART_RATE = RuleDetails(
    metric="heart_rate",
    operator=Operator.GREATER_THAN,
    threshold=120,
    duration=timedelta(seconds=30),
    severity=Severity.CRITICAL,
)


class Setup:
    def __init__(self, *, devices_unavailable: bool = False) -> None:
        self.alerts = FakeAlertStore()
        self.rules: InMemoryRepository[AlertRule] = InMemoryRepository("alert_rule")
        self.states = FakeRuleStates()
        self.devices = FakeDeviceDirectory(
            DeviceAssignment(DEVICE, MAKER, ORG_A, PATIENT_A1),
            DeviceAssignment(FREE_DEVICE, MAKER, ORG_A, ""),
            DeviceAssignment(B_DEVICE, MAKER, ORG_B, f"{ORG_B}/patients/p9"),
            DeviceAssignment(MAKER_DEVICE, MAKER, "", ""),
            unavailable=devices_unavailable,
        )
        self.trail = RecordingAuditTrail("alert")
        self.cache = RuleCache(self.rules)
        self.service = AlertService(self.alerts, self.devices, self.trail)
        self.rule_service = AlertRuleService(self.rules, self.states, self.devices, self.cache, self.trail)


@pytest.fixture
def setup() -> Setup:
    return Setup()


def an_alert(alert_id: str, organization: str = ORG_A, **changes: Any) -> Alert:
    alert = Alert(
        id=alert_id,
        organization=organization,
        device=DEVICE,
        patient=PATIENT_A1 if organization == ORG_A else "",
        severity=Severity.MAJOR,
        state=AlertState.ACTIVE,
        title="t",
        description="",
        metric="",
        rule="",
        raise_time=T0,
    )
    return replace(alert, **changes)


def a_rule(rule_id: str = "r1", organization: str = ORG_A, **changes: Any) -> AlertRule:
    return replace(new_rule(organization, HEART_RATE, T0, rule_id), **changes)


def only_event(trail: RecordingAuditTrail) -> AuditEvent:
    assert len(trail.events) == 1, trail.events
    return trail.events[0]


def principal_id(value: object) -> str:
    return value.subject if isinstance(value, Principal) else str(value)


async def outcome(call: Callable[[], Any], principal: Principal) -> str:
    """OK, or the reason of the PERMISSION_DENIED the call raised."""
    with acting_as(principal):
        try:
            await call()
        except PermissionDenied as error:
            return error.reason
    return OK


# --- alerts: create -------------------------------------------------------------------------------


async def test_clinician_raises_a_device_alert_and_the_devices_patient_is_filled_in(setup: Setup) -> None:
    with acting_as(CLINICIAN_A, "/medmesh.alert.v1.AlertService/CreateAlert", "10.0.0.7"):
        alert = await setup.service.create(ORG_A, DEVICE_ALERT)

    assert setup.alerts.items == {alert.id: alert}
    assert (alert.organization, alert.device, alert.patient) == (ORG_A, DEVICE, PATIENT_A1)
    assert (alert.state, alert.severity, alert.title, alert.rule) == (
        AlertState.ACTIVE,
        Severity.MAJOR,
        "Sensor detached",
        "",
    )
    assert setup.devices.asked == [DEVICE]
    event = only_event(setup.trail)
    assert (event.organization, event.resource, event.description) == (ORG_A, alert.name, "alert raised")
    assert (event.actor.subject, event.method, event.source_ip) == (
        CLINICIAN_A.subject,
        "medmesh.alert.v1.AlertService/CreateAlert",
        "10.0.0.7",
    )


async def test_a_patient_given_is_kept(setup: Setup) -> None:
    other = f"{ORG_A}/patients/p2"
    with acting_as(OPERATOR_A):
        alert = await setup.service.create(ORG_A, replace(DEVICE_ALERT, patient=other))

    assert alert.patient == other


async def test_a_patient_alert_needs_no_device_lookup(setup: Setup) -> None:
    with acting_as(CLINICIAN_A):
        alert = await setup.service.create(ORG_A, AlertDetails(patient=PATIENT_A1, severity=Severity.INFO, title="x"))

    assert (alert.device, alert.patient) == ("", PATIENT_A1)
    assert setup.devices.asked == []


@pytest.mark.parametrize("device", [B_DEVICE, MAKER_DEVICE, "devices/unknown"])
async def test_only_devices_whose_data_the_organization_owns(setup: Setup, device: str) -> None:
    with acting_as(CLINICIAN_A), pytest.raises(FailedPrecondition) as caught:
        await setup.service.create(ORG_A, replace(DEVICE_ALERT, device=device))

    # Missing and foreign devices look the same: nothing to learn about other organizations.
    assert caught.value.reason == "DEVICE_NOT_IN_ORGANIZATION"
    assert [v.field for v in caught.value.field_violations] == ["alert.device"]
    assert setup.alerts.items == {}
    assert setup.trail.events == []


async def test_the_manufacturer_raises_alerts_for_devices_not_in_care(setup: Setup) -> None:
    admin = user(Role.ORGANIZATION_ADMIN, MAKER)
    with acting_as(admin):
        alert = await setup.service.create(MAKER, replace(DEVICE_ALERT, device=MAKER_DEVICE))

    assert (alert.organization, alert.patient) == (MAKER, "")


async def test_device_service_down_is_unavailable(setup: Setup) -> None:
    down = Setup(devices_unavailable=True)

    with acting_as(CLINICIAN_A), pytest.raises(Unavailable):
        await down.service.create(ORG_A, DEVICE_ALERT)
    assert down.alerts.items == {}


@pytest.mark.parametrize(
    ("principal", "expected"),
    [
        (ADMIN_A, OK),
        (CLINICIAN_A, OK),
        (OPERATOR_A, OK),
        (PATIENT, ROLE_DENIED),
        (PLATFORM_ADMIN, ROLE_DENIED),
        (ADMIN_B, ORG_DENIED),
        (CLINICIAN_B, ORG_DENIED),
    ],
    ids=principal_id,
)
async def test_create_access(setup: Setup, principal: Principal, expected: str) -> None:
    assert await outcome(lambda: setup.service.create(ORG_A, DEVICE_ALERT), principal) == expected
    assert len(setup.alerts.items) == (1 if expected == OK else 0)
    assert len(setup.trail.events) == (1 if expected == OK else 0)


async def test_access_is_checked_before_the_input(setup: Setup) -> None:
    with acting_as(CLINICIAN_B), pytest.raises(PermissionDenied):
        await setup.service.create(ORG_A, AlertDetails())
    assert setup.devices.asked == []


# --- alerts: get, list ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "expected"),
    [
        (ADMIN_A, OK),
        (CLINICIAN_A, OK),
        (OPERATOR_A, OK),
        (PLATFORM_ADMIN, OK),
        (PATIENT, ROLE_DENIED),
        (CLINICIAN_B, ORG_DENIED),
    ],
    ids=principal_id,
)
async def test_get_access(setup: Setup, principal: Principal, expected: str) -> None:
    setup.alerts.put(an_alert("a1"))

    assert await outcome(lambda: setup.service.get(f"{ORG_A}/alerts/a1"), principal) == expected
    assert setup.trail.events == []  # reads are not changes


async def test_permission_denied_before_not_found(setup: Setup) -> None:
    with acting_as(CLINICIAN_B), pytest.raises(PermissionDenied):
        await setup.service.get(f"{ORG_A}/alerts/missing")
    with acting_as(CLINICIAN_A), pytest.raises(NotFound) as caught:
        await setup.service.get(f"{ORG_A}/alerts/missing")
    assert caught.value.reason == "ALERT_NOT_FOUND"


async def test_an_alert_under_another_organizations_name_does_not_exist(setup: Setup) -> None:
    setup.alerts.put(an_alert("b1", ORG_B))

    with acting_as(CLINICIAN_A), pytest.raises(NotFound):
        await setup.service.get(f"{ORG_A}/alerts/b1")


async def test_list_is_scoped_and_newest_first(setup: Setup) -> None:
    for alert in (an_alert("a1"), an_alert("a3"), an_alert("b2", ORG_B), an_alert("a2")):
        setup.alerts.put(alert)

    with acting_as(CLINICIAN_A):
        page = await setup.service.list_alerts(ORG_A, "", 2, "")
        rest = await setup.service.list_alerts(ORG_A, "", 2, page.next_page_token)

    assert [a.id for a in page.alerts] == ["a3", "a2"]
    assert ([a.id for a in rest.alerts], rest.next_page_token) == (["a1"], "")


async def test_platform_admins_list_every_organization(setup: Setup) -> None:
    for alert in (an_alert("a1"), an_alert("b2", ORG_B)):
        setup.alerts.put(alert)

    with acting_as(PLATFORM_ADMIN):
        page = await setup.service.list_alerts("organizations/-", "", 0, "")
    assert [a.id for a in page.alerts] == ["b2", "a1"]

    with acting_as(ADMIN_A), pytest.raises(PermissionDenied):
        await setup.service.list_alerts("organizations/-", "", 0, "")


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        ("state = ACTIVE", ["a4", "a2", "a1"]),
        ("state = STATE_CLEARED", ["a3"]),
        ("state = ACTIVE AND severity = CRITICAL", ["a2"]),
        (f'device = "{FREE_DEVICE}"', ["a4"]),
        (f'state = ACTIVE AND patient = "{PATIENT_A1}"', ["a2", "a1"]),
        ('rule = "organizations/a/alertRules/r1"', ["a2"]),
        ('raise_time >= "2026-03-01T12:00:01Z"', ["a4"]),
    ],
)
async def test_current_alerts_per_organization_device_or_patient(
    setup: Setup, filter_text: str, expected: list[str]
) -> None:
    setup.alerts.put(an_alert("a1"))
    setup.alerts.put(an_alert("a2", severity=Severity.CRITICAL, rule=f"{ORG_A}/alertRules/r1"))
    setup.alerts.put(an_alert("a3", state=AlertState.CLEARED))
    setup.alerts.put(an_alert("a4", device=FREE_DEVICE, patient="", raise_time=T0 + timedelta(seconds=5)))
    setup.alerts.put(an_alert("b1", ORG_B))

    with acting_as(OPERATOR_A):
        page = await setup.service.list_alerts(ORG_A, filter_text, 0, "")

    assert [a.id for a in page.alerts] == expected


@pytest.mark.parametrize(
    "filter_text", ["state = OPEN", "severity = HIGH", 'device = "SN-1"', 'patient = "p1"', "title = x"]
)
async def test_bad_filters(setup: Setup, filter_text: str) -> None:
    with acting_as(CLINICIAN_A), pytest.raises(InvalidArgument) as caught:
        await setup.service.list_alerts(ORG_A, filter_text, 0, "")
    assert caught.value.reason == "INVALID_FILTER"


# --- alerts: clear --------------------------------------------------------------------------------


async def test_clear(setup: Setup) -> None:
    setup.alerts.put(an_alert("a1"))

    with acting_as(OPERATOR_A):
        cleared = await setup.service.clear(f"{ORG_A}/alerts/a1", "replaced the sensor")

    assert setup.alerts.items["a1"] == cleared
    assert (cleared.state, cleared.cleared_by, cleared.clear_note) == (
        AlertState.CLEARED,
        OPERATOR_A.subject,
        "replaced the sensor",
    )
    assert cleared.clear_time is not None
    event = only_event(setup.trail)
    assert (event.resource, event.description) == (cleared.name, "alert cleared")


async def test_clearing_a_cleared_alert_is_a_failed_precondition(setup: Setup) -> None:
    setup.alerts.put(an_alert("a1"))
    with acting_as(CLINICIAN_A):
        first = await setup.service.clear(f"{ORG_A}/alerts/a1", "")

        with pytest.raises(FailedPrecondition) as caught:
            await setup.service.clear(f"{ORG_A}/alerts/a1", "again")

    assert caught.value.reason == "ALREADY_CLEARED"
    assert setup.alerts.items["a1"] == first
    assert len(setup.trail.events) == 1


async def test_clearing_a_rules_alert_frees_its_slot(setup: Setup) -> None:
    rule_alert = an_alert("a1", rule=f"{ORG_A}/alertRules/r1")
    setup.alerts.put(rule_alert)

    with acting_as(CLINICIAN_A):
        await setup.service.clear(rule_alert.name, "")

    assert await setup.alerts.find_active(rule_alert.active_key) is None
    await setup.alerts.insert(an_alert("a2", rule=f"{ORG_A}/alertRules/r1"))


async def test_a_clear_that_loses_a_race_is_aborted(setup: Setup) -> None:
    setup.alerts.put(an_alert("a1"))
    original_get = setup.alerts.get

    async def get_then_someone_clears(alert_id: str) -> Alert | None:
        alert = await original_get(alert_id)
        assert alert is not None
        setup.alerts.put(alert.cleared("rule:r1", "", T0))
        return alert

    setup.alerts.get = get_then_someone_clears  # type: ignore[method-assign,assignment]
    with acting_as(CLINICIAN_A), pytest.raises(Aborted):
        await setup.service.clear(f"{ORG_A}/alerts/a1", "")
    assert setup.trail.events == []


@pytest.mark.parametrize(
    ("principal", "expected"),
    [
        (ADMIN_A, OK),
        (CLINICIAN_A, OK),
        (OPERATOR_A, OK),
        (PLATFORM_ADMIN, ROLE_DENIED),
        (PATIENT, ROLE_DENIED),
        (user(Role.OPERATOR, ORG_B), ORG_DENIED),
    ],
    ids=principal_id,
)
async def test_clear_access(setup: Setup, principal: Principal, expected: str) -> None:
    setup.alerts.put(an_alert("a1"))

    assert await outcome(lambda: setup.service.clear(f"{ORG_A}/alerts/a1", ""), principal) == expected
    assert setup.alerts.items["a1"].state is (AlertState.CLEARED if expected == OK else AlertState.ACTIVE)


# --- rules ----------------------------------------------------------------------------------------


async def test_rule_crud(setup: Setup) -> None:
    with acting_as(CLINICIAN_A):
        rule = await setup.rule_service.create(ORG_A, replace(HEART_RATE, device=DEVICE))
        assert await setup.rule_service.get(rule.name) == rule
        listed = await setup.rule_service.list_rules(ORG_A, 'metric = "heart_rate" AND enabled = true', 0, "")
        assert listed.alert_rules == [rule]

        updated = await setup.rule_service.update(
            rule.name, RuleDetails(threshold=130, enabled=False), ["threshold", "enabled"], rule.etag
        )
        assert (updated.threshold, updated.enabled, updated.revision) == (130, False, 2)
        assert (await setup.rule_service.list_rules(ORG_A, "enabled = true", 0, "")).alert_rules == []

        with pytest.raises(Aborted):
            await setup.rule_service.delete(rule.name, rule.etag)  # stale etag
        await setup.rule_service.delete(rule.name, updated.etag)
        with pytest.raises(NotFound) as caught:
            await setup.rule_service.get(rule.name)

    assert caught.value.reason == "ALERT_RULE_NOT_FOUND"
    assert [e.description for e in setup.trail.events] == [
        "alert rule created",
        "alert rule updated (enabled, threshold)",
        "alert rule deleted",
    ]
    assert {e.resource for e in setup.trail.events} == {rule.name}


async def test_rule_with_a_device_of_another_organization_is_refused(setup: Setup) -> None:
    with acting_as(ADMIN_A), pytest.raises(FailedPrecondition) as caught:
        await setup.rule_service.create(ORG_A, replace(HEART_RATE, device=B_DEVICE))

    assert [v.field for v in caught.value.field_violations] == ["alert_rule.device"]
    assert setup.rules.items == {}


async def test_rule_update_checks_a_new_device(setup: Setup) -> None:
    rule = a_rule()
    setup.rules.put(rule)

    with acting_as(ADMIN_A), pytest.raises(FailedPrecondition):
        await setup.rule_service.update(rule.name, RuleDetails(device=B_DEVICE), ["device"], "")
    with acting_as(ADMIN_A):
        updated = await setup.rule_service.update(rule.name, RuleDetails(device=FREE_DEVICE), ["device"], "")
    assert updated.device == FREE_DEVICE


async def test_rule_changes_reach_evaluation_in_this_process_at_once(setup: Setup) -> None:
    rule = a_rule()
    setup.rules.put(rule)
    assert await setup.cache.enabled_rules(ORG_A) == (rule,)

    with acting_as(ADMIN_A):
        await setup.rule_service.update(rule.name, RuleDetails(enabled=False), ["enabled"], "")
    assert await setup.cache.enabled_rules(ORG_A) == ()

    with acting_as(ADMIN_A):
        created = await setup.rule_service.create(ORG_A, HEART_RATE)
    assert await setup.cache.enabled_rules(ORG_A) == (created,)


async def test_deleting_a_rule_drops_its_states_and_keeps_its_alerts(setup: Setup) -> None:
    rule, other = a_rule(), a_rule("r2")
    setup.rules.put(rule)
    setup.rules.put(other)
    setup.states.items = {
        "1": RuleState(rule.name, DEVICE, ORG_A),
        "2": RuleState(other.name, DEVICE, ORG_A),
    }
    setup.alerts.put(an_alert("a1", rule=rule.name))

    with acting_as(CLINICIAN_A):
        await setup.rule_service.delete(rule.name, "")

    assert [s.rule for s in setup.states.items.values()] == [other.name]
    assert setup.alerts.items["a1"].state is AlertState.ACTIVE


async def test_rule_limit_per_organization(setup: Setup) -> None:
    for index in range(MAX_RULES_PER_ORGANIZATION):
        setup.rules.put(a_rule(f"r{index:03d}"))
    setup.rules.put(a_rule("b1", ORG_B))

    with acting_as(ADMIN_A), pytest.raises(FailedPrecondition) as caught:
        await setup.rule_service.create(ORG_A, HEART_RATE)
    assert caught.value.reason == "ALERT_RULE_LIMIT_REACHED"

    with acting_as(ADMIN_B):
        await setup.rule_service.create(ORG_B, HEART_RATE)


@pytest.mark.parametrize(
    ("principal", "write", "read"),
    [
        (ADMIN_A, OK, OK),
        (CLINICIAN_A, OK, OK),
        (OPERATOR_A, ROLE_DENIED, OK),
        (PLATFORM_ADMIN, ROLE_DENIED, OK),
        (PATIENT, ROLE_DENIED, ROLE_DENIED),
        (ADMIN_B, ORG_DENIED, ORG_DENIED),
    ],
    ids=principal_id,
)
async def test_rule_access(setup: Setup, principal: Principal, write: str, read: str) -> None:
    rule = a_rule()
    setup.rules.put(rule)
    service = setup.rule_service

    assert await outcome(lambda: service.create(ORG_A, HEART_RATE), principal) == write
    assert (
        await outcome(lambda: service.update(rule.name, RuleDetails(threshold=1), ["threshold"], ""), principal)
        == write
    )
    assert await outcome(lambda: service.get(rule.name), principal) == read
    assert await outcome(lambda: service.list_rules(ORG_A, "", 0, ""), principal) == read
    assert await outcome(lambda: service.delete(rule.name, ""), principal) == write
    assert len(setup.trail.events) == (3 if write == OK else 0)


async def test_rule_permission_denied_before_not_found(setup: Setup) -> None:
    with acting_as(ADMIN_B), pytest.raises(PermissionDenied):
        await setup.rule_service.delete(f"{ORG_A}/alertRules/missing", "")
    with acting_as(ADMIN_A), pytest.raises(NotFound):
        await setup.rule_service.delete(f"{ORG_A}/alertRules/missing", "")


async def test_rule_list_filters(setup: Setup) -> None:
    setup.rules.put(a_rule("r1"))
    setup.rules.put(a_rule("r2", device=DEVICE, severity=Severity.MINOR))
    setup.rules.put(a_rule("r3", metric="spo2", enabled=False))
    setup.rules.put(a_rule("b1", ORG_B))

    async def ids(filter_text: str) -> list[str]:
        with acting_as(OPERATOR_A):
            return [r.id for r in (await setup.rule_service.list_rules(ORG_A, filter_text, 0, "")).alert_rules]

    assert await ids("") == ["r1", "r2", "r3"]
    assert await ids('device = ""') == ["r1", "r3"]
    assert await ids(f'device = "{DEVICE}"') == ["r2"]
    assert await ids("enabled = false") == ["r3"]
    assert await ids("severity = MINOR") == ["r2"]
    with pytest.raises(InvalidArgument):
        await ids("enabled = yes")
