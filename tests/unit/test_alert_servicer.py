"""The alert servicers: protobuf <-> domain, and the whole call path through the shared interceptor,
including the internal EvaluateObservations behind the mesh credential."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_status import rpc_status

from medmesh.alert.v1 import alert_service_pb2 as pb
from medmesh.alert.v1 import alert_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import INTERNAL_HEADER, Authenticator, Principal, Role, TokenVerifier
from medmesh.runtime.interceptors import RequestInterceptor
from services.alert.domain import (
    Alert,
    AlertRule,
    AlertState,
    DeviceAssignment,
    Operator,
    RuleDetails,
    Severity,
)
from services.alert.evaluation import RuleCache, RuleEvaluator
from services.alert.service import AlertRuleService, AlertService
from services.alert.servicer import (
    EVALUATE_OBSERVATIONS,
    AlertInternalServicer,
    AlertServicer,
    alert_details_from_pb,
    alert_to_pb,
    rule_details_from_pb,
    rule_to_pb,
    sample_from_pb,
)
from tests.rich_status import unpack_details
from tests.unit.fakes import InMemoryRepository
from tests.unit.test_alert_fakes import FakeAlertStore, FakeDeviceDirectory, FakeRuleStates

ORG_A = "organizations/a"
DEVICE = "devices/SN-1"
PATIENT = f"{ORG_A}/patients/p1"
AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
TOKEN = "mesh-secret"
ALERT = Alert(
    id="a1",
    organization=ORG_A,
    device=DEVICE,
    patient=PATIENT,
    severity=Severity.MINOR,
    state=AlertState.CLEARED,
    title="Tachycardia",
    description="d",
    metric="heart_rate",
    rule=f"{ORG_A}/alertRules/r1",
    raise_time=AT,
    clear_time=AT + timedelta(seconds=9),
    cleared_by="rule:r1",
    clear_note="back to 90",
)
RULE = AlertRule(
    id="r1",
    organization=ORG_A,
    display_name="Tachycardia",
    metric="heart_rate",
    operator=Operator.LESS_THAN_OR_EQUAL,
    threshold=40,
    duration=timedelta(seconds=30, milliseconds=5),
    severity=Severity.CRITICAL,
    device=DEVICE,
    enabled=False,
    clear_automatically=True,
    create_time=AT,
    update_time=AT,
    revision=2,
)


# --- conversions ----------------------------------------------------------------------------------


def test_alert_to_pb() -> None:
    message = alert_to_pb(ALERT)

    assert (message.name, message.device, message.patient) == (f"{ORG_A}/alerts/a1", DEVICE, PATIENT)
    assert (message.severity, message.state) == (pb.SEVERITY_MINOR, pb.Alert.STATE_CLEARED)
    assert (message.title, message.description, message.metric, message.rule) == (
        "Tachycardia",
        "d",
        "heart_rate",
        f"{ORG_A}/alertRules/r1",
    )
    assert message.raise_time.ToDatetime(tzinfo=UTC) == AT
    assert message.clear_time.ToDatetime(tzinfo=UTC) == AT + timedelta(seconds=9)
    assert (message.cleared_by, message.clear_note) == ("rule:r1", "back to 90")


def test_an_active_alert_has_no_clear_time() -> None:
    message = alert_to_pb(Alert(**{**ALERT.__dict__, "state": AlertState.ACTIVE, "clear_time": None}))

    assert message.state == pb.Alert.STATE_ACTIVE
    assert not message.HasField("clear_time")


@pytest.mark.parametrize(
    ("severity", "pb_severity"),
    [
        (Severity.CRITICAL, pb.SEVERITY_CRITICAL),
        (Severity.MAJOR, pb.SEVERITY_MAJOR),
        (Severity.MINOR, pb.SEVERITY_MINOR),
        (Severity.INFO, pb.SEVERITY_INFO),
        (None, pb.SEVERITY_UNSPECIFIED),
    ],
)
def test_severity_from_pb(severity: Severity | None, pb_severity: int) -> None:
    assert alert_details_from_pb(pb.Alert(severity=pb_severity)).severity == severity  # type: ignore[arg-type]


def test_rule_round_trip() -> None:
    message = rule_to_pb(RULE)

    assert message.name == f"{ORG_A}/alertRules/r1"
    assert (message.operator, message.threshold, message.severity) == (
        pb.AlertRule.OPERATOR_LESS_THAN_OR_EQUAL,
        40,
        pb.SEVERITY_CRITICAL,
    )
    assert message.duration.ToTimedelta() == timedelta(seconds=30, milliseconds=5)
    assert (message.HasField("enabled"), message.enabled, message.clear_automatically) == (True, False, True)
    assert message.etag == RULE.etag
    assert rule_details_from_pb(message) == RuleDetails(
        display_name="Tachycardia",
        metric="heart_rate",
        operator=Operator.LESS_THAN_OR_EQUAL,
        threshold=40,
        duration=timedelta(seconds=30, milliseconds=5),
        severity=Severity.CRITICAL,
        device=DEVICE,
        enabled=False,
        clear_automatically=True,
    )


def test_unset_switches_mean_the_default() -> None:
    details = rule_details_from_pb(pb.AlertRule(metric="heart_rate"))

    assert (details.enabled, details.clear_automatically, details.operator) == (None, None, None)


@pytest.mark.parametrize("operator", list(Operator))
def test_every_operator_converts(operator: Operator) -> None:
    rule = AlertRule(**{**RULE.__dict__, "operator": operator})
    assert rule_details_from_pb(rule_to_pb(rule)).operator is operator


def test_sample_from_pb() -> None:
    stamp = Timestamp()
    stamp.FromDatetime(AT)
    message = pb.ObservationSample(
        device=DEVICE, organization=ORG_A, patient=PATIENT, metric="heart_rate", value=128.5, time=stamp
    )

    sample = sample_from_pb(message)

    assert (sample.device, sample.organization, sample.patient, sample.metric) == (DEVICE, ORG_A, PATIENT, "heart_rate")
    assert (sample.value, sample.time) == (128.5, AT)


# --- over gRPC, through the shared interceptor ----------------------------------------------------


class HeaderAuthenticator(Authenticator):
    """Token verification stands in as a caller named in metadata; internal methods are checked for real."""

    principals: ClassVar[dict[str, Principal]] = {
        "clinician": Principal("organizations/a/users/c", ORG_A, Role.CLINICIAN),
        "admin": Principal("organizations/a/users/admin", ORG_A, Role.ORGANIZATION_ADMIN),
        "outsider": Principal("organizations/b/users/c", "organizations/b", Role.CLINICIAN),
    }

    def __init__(self) -> None:
        super().__init__(
            TokenVerifier(keys=None),  # type: ignore[arg-type]
            internal_methods=frozenset({EVALUATE_OBSERVATIONS}),
            internal_token=TOKEN,
        )

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal | None:
        if method == EVALUATE_OBSERVATIONS:
            return await super().authenticate(method, metadata)
        return self.principals[metadata["x-test-caller"]]


@dataclass
class Stubs:
    alerts: Any
    internal: Any
    trail: RecordingAuditTrail


@pytest.fixture
async def stubs() -> AsyncIterator[Stubs]:
    trail = RecordingAuditTrail("alert")
    alerts, states = FakeAlertStore(), FakeRuleStates()
    rules: InMemoryRepository[AlertRule] = InMemoryRepository("alert_rule")
    devices = FakeDeviceDirectory(DeviceAssignment(DEVICE, "organizations/maker", ORG_A, PATIENT))
    cache = RuleCache(rules)
    server = grpc.aio.server(interceptors=[RequestInterceptor("alert.medmesh", HeaderAuthenticator())])
    pb_grpc.add_AlertServiceServicer_to_server(  # type: ignore[no-untyped-call]
        AlertServicer(AlertService(alerts, devices, trail), AlertRuleService(rules, states, devices, cache, trail)),
        server,
    )
    pb_grpc.add_AlertInternalServiceServicer_to_server(  # type: ignore[no-untyped-call]
        AlertInternalServicer(RuleEvaluator(cache, alerts, states, trail)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Stubs(
                pb_grpc.AlertServiceStub(channel),  # type: ignore[no-untyped-call]
                pb_grpc.AlertInternalServiceStub(channel),  # type: ignore[no-untyped-call]
                trail,
            )
    finally:
        await server.stop(grace=None)


def as_(caller: str) -> list[tuple[str, str]]:
    return [("x-test-caller", caller)]


MESH = [(INTERNAL_HEADER, TOKEN), ("x-medmesh-caller", "observation")]


async def call_error(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)
    assert status is not None
    infos, bad_requests = unpack_details(status)
    assert len(infos) == 1
    assert infos[0].domain == "alert.medmesh"
    fields = [v.field for b in bad_requests for v in b.field_violations]
    return caught.value.code(), infos[0].reason, fields


def hr(seconds: int, value: float) -> pb.ObservationSample:
    stamp = Timestamp()
    stamp.FromDatetime(AT + timedelta(seconds=seconds))
    return pb.ObservationSample(
        device=DEVICE, organization=ORG_A, patient=PATIENT, metric="heart_rate", value=value, time=stamp
    )


async def test_grpc_rule_then_ingest_raises_and_clears(stubs: Stubs) -> None:
    body = pb.AlertRule(
        metric="heart_rate",
        operator=pb.AlertRule.OPERATOR_GREATER_THAN,
        threshold=120,
        severity=pb.SEVERITY_CRITICAL,
    )
    body.duration.FromTimedelta(timedelta(seconds=30))
    rule = await stubs.alerts.CreateAlertRule(
        pb.CreateAlertRuleRequest(parent=ORG_A, alert_rule=body), metadata=as_("clinician")
    )
    assert rule.name.startswith(f"{ORG_A}/alertRules/")
    assert (rule.enabled, rule.clear_automatically) == (True, True)

    evaluate = stubs.internal.EvaluateObservations
    first = await evaluate(
        pb.EvaluateObservationsRequest(samples=[hr(0, 130), hr(10, 135), hr(20, 140)]), metadata=MESH
    )
    assert (list(first.raised_alerts), list(first.cleared_alerts)) == ([], [])
    raised = await evaluate(pb.EvaluateObservationsRequest(samples=[hr(31, 128)]), metadata=MESH)
    [alert_name] = raised.raised_alerts

    current = await stubs.alerts.ListAlerts(
        pb.ListAlertsRequest(parent=ORG_A, filter=f'state = ACTIVE AND patient = "{PATIENT}"'),
        metadata=as_("clinician"),
    )
    assert [a.name for a in current.alerts] == [alert_name]
    assert (current.alerts[0].rule, current.alerts[0].severity) == (rule.name, pb.SEVERITY_CRITICAL)

    cleared = await evaluate(pb.EvaluateObservationsRequest(samples=[hr(40, 90)]), metadata=MESH)
    assert list(cleared.cleared_alerts) == [alert_name]
    alert = await stubs.alerts.GetAlert(pb.GetAlertRequest(name=alert_name), metadata=as_("clinician"))
    assert (alert.state, alert.cleared_by) == (pb.Alert.STATE_CLEARED, f"rule:{rule.name.rsplit('/', 1)[1]}")

    code, reason, _ = await call_error(
        stubs.alerts.ClearAlert(pb.ClearAlertRequest(name=alert_name), metadata=as_("clinician"))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_CLEARED")
    assert [e.description.split(" ", 2)[:2] for e in stubs.trail.events] == [
        ["alert", "rule"],
        ["alert", "raised"],
        ["alert", "cleared"],
    ]
    assert stubs.trail.events[1].method == "medmesh.alert.v1.AlertInternalService/EvaluateObservations"


async def test_grpc_manual_alert_and_clear(stubs: Stubs) -> None:
    created = await stubs.alerts.CreateAlert(
        pb.CreateAlertRequest(
            parent=ORG_A, alert=pb.Alert(device=DEVICE, severity=pb.SEVERITY_MAJOR, title="Sensor detached")
        ),
        metadata=as_("clinician"),
    )
    assert (created.state, created.patient) == (pb.Alert.STATE_ACTIVE, PATIENT)

    cleared = await stubs.alerts.ClearAlert(
        pb.ClearAlertRequest(name=created.name, note="reattached"), metadata=as_("admin")
    )

    assert (cleared.state, cleared.cleared_by, cleared.clear_note) == (
        pb.Alert.STATE_CLEARED,
        "organizations/a/users/admin",
        "reattached",
    )
    assert cleared.HasField("clear_time")


async def test_grpc_rule_update_and_delete(stubs: Stubs) -> None:
    body = pb.AlertRule(
        metric="spo2", operator=pb.AlertRule.OPERATOR_LESS_THAN, threshold=90, severity=pb.SEVERITY_MAJOR
    )
    rule = await stubs.alerts.CreateAlertRule(
        pb.CreateAlertRuleRequest(parent=ORG_A, alert_rule=body), metadata=as_("admin")
    )

    update = pb.AlertRule(name=rule.name, etag=rule.etag, enabled=False)
    updated = await stubs.alerts.UpdateAlertRule(
        pb.UpdateAlertRuleRequest(alert_rule=update, update_mask=field_mask_pb2.FieldMask(paths=["enabled"])),
        metadata=as_("admin"),
    )
    assert (updated.enabled, updated.threshold) == (False, 90)
    listed = await stubs.alerts.ListAlertRules(pb.ListAlertRulesRequest(parent=ORG_A), metadata=as_("clinician"))
    assert [r.name for r in listed.alert_rules] == [rule.name]

    await stubs.alerts.DeleteAlertRule(pb.DeleteAlertRuleRequest(name=rule.name), metadata=as_("admin"))
    code, reason, _ = await call_error(
        stubs.alerts.GetAlertRule(pb.GetAlertRuleRequest(name=rule.name), metadata=as_("admin"))
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ALERT_RULE_NOT_FOUND")


async def test_grpc_permission_denied_before_not_found(stubs: Stubs) -> None:
    code, reason, _ = await call_error(
        stubs.alerts.GetAlert(pb.GetAlertRequest(name=f"{ORG_A}/alerts/nothing"), metadata=as_("outsider"))
    )

    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ORGANIZATION_ACCESS_DENIED")


async def test_grpc_evaluate_needs_the_mesh_credential(stubs: Stubs) -> None:
    request = pb.EvaluateObservationsRequest(samples=[hr(0, 130)])

    code, reason, _ = await call_error(stubs.internal.EvaluateObservations(request, metadata=as_("admin")))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INTERNAL_ONLY")

    wrong = [(INTERNAL_HEADER, "guess"), ("x-medmesh-caller", "observation")]
    code, reason, _ = await call_error(stubs.internal.EvaluateObservations(request, metadata=wrong))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INTERNAL_ONLY")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"device": "SN-1"}, "samples[0].device"),
        ({"organization": "a"}, "samples[0].organization"),
        ({"patient": "p1"}, "samples[0].patient"),
        ({"metric": ""}, "samples[0].metric"),
        ({"time": None}, "samples[0].time"),
    ],
)
async def test_grpc_malformed_samples_are_named(stubs: Stubs, changes: dict[str, Any], field: str) -> None:
    bad = hr(0, 1)
    for name, value in changes.items():
        if value is None:
            bad.ClearField(name)
        else:
            setattr(bad, name, value)

    code, _, fields = await call_error(
        stubs.internal.EvaluateObservations(pb.EvaluateObservationsRequest(samples=[hr(0, 1), bad]), metadata=MESH)
    )

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == [field.replace("[0]", "[1]")]


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        (pb.AlertRule(metric="heart rate"), "alert_rule.metric"),
        (pb.AlertRule(threshold=float("inf")), "alert_rule.threshold"),
        (pb.AlertRule(device="SN-1"), "alert_rule.device"),
        (pb.AlertRule(operator=42), "alert_rule.operator"),  # type: ignore[arg-type]
    ],
)
async def test_grpc_invalid_rule_fields_are_named(stubs: Stubs, rule: pb.AlertRule, field: str) -> None:
    code, _, fields = await call_error(
        stubs.alerts.CreateAlertRule(pb.CreateAlertRuleRequest(parent=ORG_A, alert_rule=rule), metadata=as_("admin"))
    )

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == [field]
    assert stubs.trail.events == []


async def test_grpc_missing_required_rule_fields_are_named_by_the_domain(stubs: Stubs) -> None:
    rule = pb.AlertRule(metric="heart_rate", operator=pb.AlertRule.OPERATOR_GREATER_THAN, threshold=1)

    code, _, fields = await call_error(
        stubs.alerts.CreateAlertRule(pb.CreateAlertRuleRequest(parent=ORG_A, alert_rule=rule), metadata=as_("admin"))
    )

    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["alert_rule.severity"])


async def test_grpc_negative_duration_is_refused(stubs: Stubs) -> None:
    rule = pb.AlertRule(metric="m", operator=pb.AlertRule.OPERATOR_GREATER_THAN, severity=pb.SEVERITY_INFO)
    rule.duration.FromTimedelta(timedelta(seconds=-1))

    code, _, fields = await call_error(
        stubs.alerts.CreateAlertRule(pb.CreateAlertRuleRequest(parent=ORG_A, alert_rule=rule), metadata=as_("admin"))
    )

    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["alert_rule.duration"])
