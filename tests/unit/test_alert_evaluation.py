"""RuleEvaluator against in-memory fakes: raising and clearing on ingest, order within and across
batches, one active alert per (rule, device) under concurrency, the rule cache, and audit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.errors import InvalidArgument, PermissionDenied
from services.alert.domain import AlertRule, AlertState, Operator, RuleDetails, Sample, Severity, new_rule, rule_key
from services.alert.evaluation import RuleCache, RuleEvaluator
from tests.unit.fakes import InMemoryRepository
from tests.unit.test_alert_fakes import FakeAlertStore, FakeRuleStates

ORG_A = "organizations/a"
ORG_B = "organizations/b"
DEVICE = "devices/SN-1"
OTHER_DEVICE = "devices/SN-2"
PATIENT = f"{ORG_A}/patients/p1"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OBSERVATION = internal_principal("observation")
HEART_RATE_OVER_120_FOR_30S = RuleDetails(
    display_name="Tachycardia",
    metric="heart_rate",
    operator=Operator.GREATER_THAN,
    threshold=120,
    duration=timedelta(seconds=30),
    severity=Severity.CRITICAL,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Setup:
    def __init__(self) -> None:
        self.rules: InMemoryRepository[AlertRule] = InMemoryRepository("alert_rule")
        self.alerts = FakeAlertStore()
        self.states = FakeRuleStates()
        self.trail = RecordingAuditTrail("alert")
        self.clock = Clock()
        self.cache = RuleCache(self.rules, clock=self.clock)
        self.evaluator = RuleEvaluator(self.cache, self.alerts, self.states, self.trail)

    def add_rule(self, rule_id: str = "r1", organization: str = ORG_A, **changes: object) -> AlertRule:
        details = replace(HEART_RATE_OVER_120_FOR_30S, **changes)  # type: ignore[arg-type]
        rule = new_rule(organization, details, T0, rule_id)
        self.rules.put(rule)
        return rule

    async def evaluate(self, *samples: Sample) -> tuple[list[str], list[str]]:
        result = await self.evaluator.evaluate(list(samples))
        return [a.name for a in result.raised], [a.name for a in result.cleared]


@pytest.fixture
def setup() -> Setup:
    return Setup()


@pytest.fixture(autouse=True)
def as_the_observation_service() -> Iterator[None]:
    with acting_as(OBSERVATION, "/medmesh.alert.v1.AlertInternalService/EvaluateObservations"):
        yield


def hr(
    seconds: float, value: float, device: str = DEVICE, organization: str = ORG_A, metric: str = "heart_rate"
) -> Sample:
    patient = PATIENT if organization == ORG_A else ""
    return Sample(device, organization, patient, metric, value, T0 + timedelta(seconds=seconds))


# --- the example of the issue ---------------------------------------------------------------------


async def test_heart_rate_over_120_for_30s_raises_at_31s_and_clears_at_40s(setup: Setup) -> None:
    rule = setup.add_rule()

    assert await setup.evaluate(hr(0, 130), hr(10, 135), hr(20, 140)) == ([], [])
    assert setup.alerts.items == {}

    raised, _ = await setup.evaluate(hr(31, 128))

    [alert] = setup.alerts.items.values()
    assert raised == [alert.name]
    assert (alert.state, alert.severity, alert.title) == (AlertState.ACTIVE, Severity.CRITICAL, "Tachycardia")
    assert (alert.organization, alert.device, alert.patient) == (ORG_A, DEVICE, PATIENT)
    assert (alert.metric, alert.rule, alert.raise_time) == ("heart_rate", rule.name, T0 + timedelta(seconds=31))

    _, cleared = await setup.evaluate(hr(40, 90))

    assert cleared == [alert.name]
    done = setup.alerts.items[alert.id]
    assert (done.state, done.cleared_by, done.clear_time) == (AlertState.CLEARED, "rule:r1", T0 + timedelta(seconds=40))
    assert "90" in done.clear_note
    assert [(e.resource, e.description) for e in setup.trail.events] == [
        (alert.name, f"alert raised by rule {rule.name}"),
        (alert.name, f"alert cleared by rule {rule.name}"),
    ]
    assert all(e.organization == ORG_A and e.actor.subject == "internal:observation" for e in setup.trail.events)


async def test_the_example_in_one_batch_out_of_order(setup: Setup) -> None:
    setup.add_rule()

    raised, cleared = await setup.evaluate(hr(40, 90), hr(20, 140), hr(0, 130), hr(31, 128), hr(10, 135))

    assert len(raised) == 1
    assert cleared == raised
    assert setup.alerts.active() == []
    assert len(setup.trail.events) == 2


async def test_the_example_one_sample_per_batch(setup: Setup) -> None:
    setup.add_rule()
    results = [await setup.evaluate(s) for s in (hr(0, 130), hr(10, 135), hr(20, 140), hr(31, 128), hr(40, 90))]

    assert [(len(r), len(c)) for r, c in results] == [(0, 0), (0, 0), (0, 0), (1, 0), (0, 1)]


# --- order, repeats, cost -------------------------------------------------------------------------


async def test_a_sample_older_than_the_last_evaluated_is_ignored(setup: Setup) -> None:
    setup.add_rule()
    await setup.evaluate(hr(0, 130), hr(31, 128))

    # Arrives late: had it counted, it would clear the alert.
    assert await setup.evaluate(hr(20, 90)) == ([], [])
    assert len(setup.alerts.active()) == 1


async def test_repeating_a_batch_changes_nothing(setup: Setup) -> None:
    setup.add_rule()
    batch = (hr(0, 130), hr(10, 135), hr(31, 128))
    await setup.evaluate(*batch)
    writes = setup.states.writes

    assert await setup.evaluate(*batch) == ([], [])
    assert len(setup.alerts.items) == 1
    assert len(setup.trail.events) == 1
    assert setup.states.writes == writes  # nothing changed: nothing written


async def test_one_state_read_and_write_per_rule_and_device_per_batch(setup: Setup) -> None:
    setup.add_rule()
    setup.add_rule("r2", metric="spo2", operator=Operator.LESS_THAN, threshold=90)

    await setup.evaluate(*(hr(s, 100) for s in range(50)), *(hr(s, 100, OTHER_DEVICE) for s in range(50)))

    assert (setup.states.reads, setup.states.writes) == (2, 2)  # r1 x 2 devices; r2 has no spo2 samples


async def test_rules_are_read_once_per_cache_period(setup: Setup) -> None:
    setup.add_rule(duration=timedelta(0))
    reads = 0
    original = setup.rules.list

    async def counting_list(*args: object) -> list[AlertRule]:
        nonlocal reads
        reads += 1
        return await original(*args)  # type: ignore[arg-type]

    setup.rules.list = counting_list  # type: ignore[method-assign,assignment]
    for second in range(5):
        await setup.evaluate(hr(second, 100))
    assert reads == 1

    setup.clock.now += 2.5
    await setup.evaluate(hr(10, 100))
    assert reads == 2


async def test_a_rule_change_takes_effect_after_the_cache_period(setup: Setup) -> None:
    rule = setup.add_rule(duration=timedelta(0))
    await setup.evaluate(hr(0, 100))

    setup.rules.put(replace(rule, threshold=90, revision=2))  # changed by another instance
    assert await setup.evaluate(hr(1, 100)) == ([], [])  # still the cached rule

    setup.clock.now += 2.5
    raised, _ = await setup.evaluate(hr(2, 100))
    assert len(raised) == 1


async def test_forget_applies_a_local_change_at_once(setup: Setup) -> None:
    rule = setup.add_rule(duration=timedelta(0))
    await setup.evaluate(hr(0, 100))

    setup.rules.put(replace(rule, threshold=90, revision=2))
    setup.cache.forget(ORG_A)

    raised, _ = await setup.evaluate(hr(1, 100))
    assert len(raised) == 1


# --- which rules apply ----------------------------------------------------------------------------


async def test_only_the_samples_organizations_rules_apply(setup: Setup) -> None:
    setup.add_rule("ra", ORG_A, duration=timedelta(0))
    setup.add_rule("rb", ORG_B, duration=timedelta(0))

    raised, _ = await setup.evaluate(hr(0, 130, organization=ORG_B))

    assert raised == [f"{ORG_B}/alerts/{setup.alerts.active()[0].id}"]
    assert setup.alerts.active()[0].rule == f"{ORG_B}/alertRules/rb"


async def test_a_rule_for_one_device_ignores_the_others(setup: Setup) -> None:
    setup.add_rule(duration=timedelta(0), device=OTHER_DEVICE)

    assert await setup.evaluate(hr(0, 130), hr(0, 70, metric="spo2")) == ([], [])
    raised, _ = await setup.evaluate(hr(0, 130, OTHER_DEVICE))
    assert len(raised) == 1


async def test_disabled_rules_and_other_metrics_do_nothing(setup: Setup) -> None:
    setup.add_rule(duration=timedelta(0), enabled=False)
    setup.add_rule("r2", duration=timedelta(0), metric="spo2")

    assert await setup.evaluate(hr(0, 130)) == ([], [])
    assert setup.states.items == {}


async def test_each_device_has_its_own_window_and_alert(setup: Setup) -> None:
    setup.add_rule()

    raised, _ = await setup.evaluate(hr(0, 130), hr(0, 130, OTHER_DEVICE), hr(30, 130), hr(30, 130, OTHER_DEVICE))

    assert len(raised) == 2
    assert {a.device for a in setup.alerts.active()} == {DEVICE, OTHER_DEVICE}


async def test_non_finite_values_are_ignored(setup: Setup) -> None:
    setup.add_rule()
    await setup.evaluate(hr(0, 130), hr(31, 130))

    assert await setup.evaluate(hr(40, float("nan"))) == ([], [])
    assert len(setup.alerts.active()) == 1


# --- clearing -------------------------------------------------------------------------------------


async def test_without_automatic_clear_the_alert_stays_active(setup: Setup) -> None:
    setup.add_rule(clear_automatically=False)

    raised, cleared = await setup.evaluate(hr(0, 130), hr(31, 130), hr(40, 90), hr(50, 130), hr(90, 130))

    assert (len(raised), cleared) == (1, [])
    assert len(setup.alerts.active()) == 1


async def test_after_a_person_clears_an_ongoing_condition_it_is_raised_again_after_the_duration(
    setup: Setup,
) -> None:
    setup.add_rule()
    [first] = (await setup.evaluate(hr(0, 130), hr(31, 130)))[0]
    alert = setup.alerts.active()[0]
    setup.alerts.put(alert.cleared("organizations/a/users/nurse", "checked", T0 + timedelta(seconds=35)))

    assert await setup.evaluate(hr(40, 130), hr(60, 130)) == ([], [])  # a new window started at 40 s
    raised, _ = await setup.evaluate(hr(70, 130))

    assert len(raised) == 1
    assert raised != [first]
    assert len(setup.alerts.active()) == 1


async def test_an_alert_cleared_by_a_person_is_not_cleared_again(setup: Setup) -> None:
    setup.add_rule()
    await setup.evaluate(hr(0, 130), hr(31, 130))
    alert = setup.alerts.active()[0]
    by_nurse = alert.cleared("organizations/a/users/nurse", "checked", T0 + timedelta(seconds=35))
    setup.alerts.put(by_nurse)

    assert await setup.evaluate(hr(40, 90)) == ([], [])
    assert setup.alerts.items[alert.id] == by_nurse
    assert len(setup.trail.events) == 1  # the raise only


# --- one active alert per (rule, device) ---------------------------------------------------------


async def test_a_raise_by_another_instance_is_adopted_not_duplicated(setup: Setup) -> None:
    """Another instance raised the alert for this episode; its state write is not seen here."""
    rule = setup.add_rule(duration=timedelta(0))
    elsewhere = RuleEvaluator(RuleCache(setup.rules), setup.alerts, FakeRuleStates(), setup.trail)
    [theirs] = (await elsewhere.evaluate([hr(0, 130)])).raised

    assert await setup.evaluate(hr(0, 130), hr(5, 90)) == ([], [theirs.name])
    assert setup.alerts.inserts == 1
    assert setup.states.items[rule_key(rule.name, DEVICE)].active_alert == ""


async def test_concurrent_batches_in_one_instance_raise_one_alert(setup: Setup) -> None:
    setup.add_rule(duration=timedelta(0))

    results = await asyncio.gather(*(setup.evaluator.evaluate([hr(i, 130)]) for i in range(20)))

    assert sum(len(r.raised) for r in results) == 1
    assert len(setup.alerts.items) == 1


async def test_concurrent_batches_in_many_instances_raise_one_alert(setup: Setup) -> None:
    """Separate processes share only the database: the unique active_key decides, not the locks."""
    setup.add_rule(duration=timedelta(0))
    instances = [RuleEvaluator(RuleCache(setup.rules), setup.alerts, setup.states, setup.trail) for _ in range(5)]

    results = await asyncio.gather(*(e.evaluate([hr(0, 130)]) for e in instances for _ in range(4)))

    assert sum(len(r.raised) for r in results) == 1
    assert len(setup.alerts.items) == 1
    assert len(setup.trail.events) == 1
    [state] = setup.states.items.values()
    assert state.active_alert == setup.alerts.active()[0].id


# --- who may call ---------------------------------------------------------------------------------


async def test_only_internal_callers(setup: Setup) -> None:
    setup.add_rule(duration=timedelta(0))
    admin = Principal("organizations/a/users/admin", ORG_A, Role.ORGANIZATION_ADMIN)

    with acting_as(admin), pytest.raises(PermissionDenied) as caught:
        await setup.evaluate(hr(0, 130))

    assert caught.value.reason == "INTERNAL_ONLY"
    assert setup.alerts.items == {}


async def test_a_malformed_sample_fails_the_call_before_anything_is_written(setup: Setup) -> None:
    setup.add_rule(duration=timedelta(0))

    with pytest.raises(InvalidArgument) as caught:
        await setup.evaluate(hr(0, 130), replace(hr(1, 130), organization="a"))

    assert [v.field for v in caught.value.field_violations] == ["samples[1].organization"]
    assert setup.alerts.items == {}
