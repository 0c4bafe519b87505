"""gRPC servicers: translate protobuf <-> domain, nothing else."""

from __future__ import annotations

from datetime import UTC

import grpc
from google.protobuf import empty_pb2

from medmesh.alert.v1 import alert_service_pb2 as pb
from medmesh.alert.v1 import alert_service_pb2_grpc as pb_grpc
from medmesh.runtime.protoconv import timestamp
from services.alert.domain import Alert, AlertDetails, AlertRule, AlertState, Operator, RuleDetails, Sample, Severity
from services.alert.evaluation import RuleEvaluator
from services.alert.service import AlertRuleService, AlertService

# Internal-only: the authenticator admits it with the mesh credential, never with a user token.
EVALUATE_OBSERVATIONS = "/medmesh.alert.v1.AlertInternalService/EvaluateObservations"

_SEVERITY_TO_PB = {
    Severity.CRITICAL: pb.SEVERITY_CRITICAL,
    Severity.MAJOR: pb.SEVERITY_MAJOR,
    Severity.MINOR: pb.SEVERITY_MINOR,
    Severity.INFO: pb.SEVERITY_INFO,
}
_SEVERITY_FROM_PB = {value: key for key, value in _SEVERITY_TO_PB.items()}
_STATE_TO_PB = {AlertState.ACTIVE: pb.Alert.STATE_ACTIVE, AlertState.CLEARED: pb.Alert.STATE_CLEARED}
_OPERATOR_TO_PB = {
    Operator.GREATER_THAN: pb.AlertRule.OPERATOR_GREATER_THAN,
    Operator.GREATER_THAN_OR_EQUAL: pb.AlertRule.OPERATOR_GREATER_THAN_OR_EQUAL,
    Operator.LESS_THAN: pb.AlertRule.OPERATOR_LESS_THAN,
    Operator.LESS_THAN_OR_EQUAL: pb.AlertRule.OPERATOR_LESS_THAN_OR_EQUAL,
    Operator.EQUAL: pb.AlertRule.OPERATOR_EQUAL,
    Operator.NOT_EQUAL: pb.AlertRule.OPERATOR_NOT_EQUAL,
}
_OPERATOR_FROM_PB = {value: key for key, value in _OPERATOR_TO_PB.items()}


def alert_to_pb(alert: Alert) -> pb.Alert:
    message = pb.Alert(
        name=alert.name,
        device=alert.device,
        patient=alert.patient,
        severity=_SEVERITY_TO_PB[alert.severity],
        state=_STATE_TO_PB[alert.state],
        title=alert.title,
        description=alert.description,
        metric=alert.metric,
        rule=alert.rule,
        raise_time=timestamp(alert.raise_time),
        cleared_by=alert.cleared_by,
        clear_note=alert.clear_note,
    )
    if alert.clear_time is not None:
        message.clear_time.CopyFrom(timestamp(alert.clear_time))
    return message


def alert_details_from_pb(alert: pb.Alert) -> AlertDetails:
    return AlertDetails(
        device=alert.device,
        patient=alert.patient,
        severity=_SEVERITY_FROM_PB.get(alert.severity),
        title=alert.title,
        description=alert.description,
    )


def rule_to_pb(rule: AlertRule) -> pb.AlertRule:
    message = pb.AlertRule(
        name=rule.name,
        display_name=rule.display_name,
        metric=rule.metric,
        operator=_OPERATOR_TO_PB[rule.operator],
        threshold=rule.threshold,
        severity=_SEVERITY_TO_PB[rule.severity],
        device=rule.device,
        enabled=rule.enabled,
        clear_automatically=rule.clear_automatically,
        create_time=timestamp(rule.create_time),
        update_time=timestamp(rule.update_time),
        etag=rule.etag,
    )
    message.duration.FromTimedelta(rule.duration)
    return message


def rule_details_from_pb(rule: pb.AlertRule) -> RuleDetails:
    return RuleDetails(
        display_name=rule.display_name,
        metric=rule.metric,
        operator=_OPERATOR_FROM_PB.get(rule.operator),
        threshold=rule.threshold,
        duration=rule.duration.ToTimedelta(),
        severity=_SEVERITY_FROM_PB.get(rule.severity),
        device=rule.device,
        enabled=rule.enabled if rule.HasField("enabled") else None,
        clear_automatically=rule.clear_automatically if rule.HasField("clear_automatically") else None,
    )


def sample_from_pb(sample: pb.ObservationSample) -> Sample:
    return Sample(
        device=sample.device,
        organization=sample.organization,
        patient=sample.patient,
        metric=sample.metric,
        value=sample.value,
        time=sample.time.ToDatetime(tzinfo=UTC),
    )


class AlertServicer(pb_grpc.AlertServiceServicer):
    def __init__(self, alerts: AlertService, rules: AlertRuleService) -> None:
        self._alerts = alerts
        self._rules = rules

    async def CreateAlert(self, request: pb.CreateAlertRequest, context: grpc.aio.ServicerContext) -> pb.Alert:
        return alert_to_pb(await self._alerts.create(request.parent, alert_details_from_pb(request.alert)))

    async def GetAlert(self, request: pb.GetAlertRequest, context: grpc.aio.ServicerContext) -> pb.Alert:
        return alert_to_pb(await self._alerts.get(request.name))

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAlertsResponse:
        page = await self._alerts.list_alerts(request.parent, request.filter, request.page_size, request.page_token)
        return pb.ListAlertsResponse(alerts=[alert_to_pb(a) for a in page.alerts], next_page_token=page.next_page_token)

    async def ClearAlert(self, request: pb.ClearAlertRequest, context: grpc.aio.ServicerContext) -> pb.Alert:
        return alert_to_pb(await self._alerts.clear(request.name, request.note))

    async def CreateAlertRule(
        self, request: pb.CreateAlertRuleRequest, context: grpc.aio.ServicerContext
    ) -> pb.AlertRule:
        return rule_to_pb(await self._rules.create(request.parent, rule_details_from_pb(request.alert_rule)))

    async def GetAlertRule(self, request: pb.GetAlertRuleRequest, context: grpc.aio.ServicerContext) -> pb.AlertRule:
        return rule_to_pb(await self._rules.get(request.name))

    async def ListAlertRules(
        self, request: pb.ListAlertRulesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAlertRulesResponse:
        page = await self._rules.list_rules(request.parent, request.filter, request.page_size, request.page_token)
        return pb.ListAlertRulesResponse(
            alert_rules=[rule_to_pb(r) for r in page.alert_rules], next_page_token=page.next_page_token
        )

    async def UpdateAlertRule(
        self, request: pb.UpdateAlertRuleRequest, context: grpc.aio.ServicerContext
    ) -> pb.AlertRule:
        rule = await self._rules.update(
            request.alert_rule.name,
            rule_details_from_pb(request.alert_rule),
            list(request.update_mask.paths),
            request.alert_rule.etag,
        )
        return rule_to_pb(rule)

    async def DeleteAlertRule(
        self, request: pb.DeleteAlertRuleRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._rules.delete(request.name, request.etag)
        return empty_pb2.Empty()


class AlertInternalServicer(pb_grpc.AlertInternalServiceServicer):
    def __init__(self, evaluator: RuleEvaluator) -> None:
        self._evaluator = evaluator

    async def EvaluateObservations(
        self, request: pb.EvaluateObservationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.EvaluateObservationsResponse:
        result = await self._evaluator.evaluate([sample_from_pb(s) for s in request.samples])
        return pb.EvaluateObservationsResponse(
            raised_alerts=[a.name for a in result.raised], cleared_alerts=[a.name for a in result.cleared]
        )
