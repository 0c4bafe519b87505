"""Use cases of the alert service: who may raise, read and clear alerts, and manage threshold rules.

Every method checks the caller against the organization named in the request before it looks
anything up (PERMISSION_DENIED before NOT_FOUND). Alerts and rules hold no PHI: patients are
named by their opaque resource name only. Patients (the role) have no access here. Every change
is audited: an alert raised or cleared, a rule created, updated or deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import ALL_ORGANIZATIONS, Principal, Role, current_principal
from medmesh.runtime.directories import DeviceAssignment, DeviceDirectory
from medmesh.runtime.errors import FailedPrecondition, FieldViolation, NotFound
from medmesh.runtime.filtering import Condition, Converter, rfc3339_timestamp
from medmesh.runtime.resources import (
    ResourceStore,
    check_etag,
    delete_checked,
    list_page,
    now,
    replace_checked,
    resolve_update_mask,
)
from services.alert.domain import (
    ALERT_RULES,
    ALERTS,
    DEVICE_PATTERN,
    METRIC_PATTERN,
    PATIENT_PATTERN,
    RULE_NAME_PATTERN,
    RULE_UPDATABLE_FIELDS,
    Alert,
    AlertDetails,
    AlertRule,
    AlertState,
    RuleDetails,
    Severity,
    new_alert,
    new_rule,
    parse_alert_name,
    parse_parent,
    parse_rule_name,
)
from services.alert.evaluation import MAX_RULES_PER_ORGANIZATION, RuleCache
from services.alert.ports import AlertStore, RuleStateStore

ALERT_WRITE_ROLES = (Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR)  # raise by hand, clear
ALERT_READ_ROLES = (Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR, Role.PLATFORM_ADMIN)
RULE_WRITE_ROLES = (Role.ORGANIZATION_ADMIN, Role.CLINICIAN)
RULE_READ_ROLES = (Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR, Role.PLATFORM_ADMIN)


def _state(written: str) -> str:
    word = written.removeprefix("STATE_")
    if word not in AlertState.__members__:
        raise ValueError(f"must be one of {', '.join(AlertState.__members__)}")
    return AlertState[word].value


def _severity(written: str) -> str:
    word = written.removeprefix("SEVERITY_")
    if word not in Severity.__members__:
        raise ValueError(f"must be one of {', '.join(Severity.__members__)}")
    return Severity[word].value


def _device(written: str) -> str:
    if not DEVICE_PATTERN.match(written):
        raise ValueError("must be a device name like devices/{device}")
    return written


def _device_or_none(written: str) -> str:
    return written if written == "" else _device(written)


def _patient(written: str) -> str:
    if not PATIENT_PATTERN.match(written):
        raise ValueError("must be a patient name like organizations/{organization}/patients/{patient}")
    return written


def _rule(written: str) -> str:
    if not RULE_NAME_PATTERN.match(written):
        raise ValueError("must be a rule name like organizations/{organization}/alertRules/{rule}")
    return written


def _metric(written: str) -> str:
    if not METRIC_PATTERN.match(written):
        raise ValueError("must be a metric name such as heart_rate")
    return written


def _boolean(written: str) -> bool:
    if written not in {"true", "false"}:
        raise ValueError("must be true or false")
    return written == "true"


ALERT_FILTER_FIELDS: dict[str, tuple[str, Converter]] = {
    "state": ("state", _state),
    "severity": ("severity", _severity),
    "device": ("device", _device),
    "patient": ("patient", _patient),
    "rule": ("rule", _rule),
    "raise_time": ("raise_time", rfc3339_timestamp),
}
RULE_FILTER_FIELDS: dict[str, tuple[str, Converter]] = {
    "metric": ("metric", _metric),
    "device": ("device", _device_or_none),
    "enabled": ("enabled", _boolean),
    "severity": ("severity", _severity),
}


@dataclass(frozen=True)
class AlertPage:
    alerts: list[Alert]
    next_page_token: str


@dataclass(frozen=True)
class AlertRulePage:
    alert_rules: list[AlertRule]
    next_page_token: str


def _authorize(principal: Principal, organization: str, resource: str, roles: tuple[Role, ...], action: str) -> None:
    principal.require_access(organization, resource)
    principal.require_role(*roles, action=action)


def _scope(organization: str) -> list[Condition]:
    # `organizations/-` passes require_access only for platform admins (and internal callers).
    return [] if organization == ALL_ORGANIZATIONS else [Condition("organization", True, organization)]


async def require_device_of(devices: DeviceDirectory, device: str, organization: str, field: str) -> DeviceAssignment:
    """The device's assignment, if `organization` owns its data. A missing device and another
    organization's device get the same answer, so the check reveals nothing about other tenants."""
    assignment = await devices.assignment(device)
    if assignment is None or assignment.data_organization != organization:
        raise FailedPrecondition(
            f"{device!r} is not a device whose data {organization!r} owns",
            reason="DEVICE_NOT_IN_ORGANIZATION",
            metadata={"device": device, "organization": organization},
            field_violations=[FieldViolation(field, "names a device whose data the organization does not own")],
        )
    return assignment


class AlertService:
    def __init__(self, store: AlertStore, devices: DeviceDirectory, trail: AuditTrail) -> None:
        self._store = store
        self._devices = devices
        self._trail = trail

    async def create(self, parent: str, details: AlertDetails) -> Alert:
        """Raises an alert by hand. For a device alone, the device's assigned patient is filled in,
        so the alert shows among the patient's current alerts too."""
        organization = parse_parent(parent)
        principal = current_principal()
        _authorize(principal, organization, organization, ALERT_WRITE_ROLES, "raise alerts")
        alert = new_alert(organization, details, now())
        if alert.device:
            assignment = await require_device_of(self._devices, alert.device, organization, "alert.device")
            if not alert.patient and assignment.patient:
                alert = replace(alert, patient=assignment.patient)
        await self._store.insert(alert)
        await audit(self._trail, organization, alert.name, description="alert raised")
        return alert

    async def get(self, name: str) -> Alert:
        organization, alert_id = parse_alert_name(name)
        _authorize(current_principal(), organization, name, ALERT_READ_ROLES, "read alerts")
        return await self._find(organization, alert_id)

    async def list_alerts(self, parent: str, filter_text: str, page_size: int, page_token: str) -> AlertPage:
        organization = parse_parent(parent, allow_all=True)
        _authorize(current_principal(), organization, organization, ALERT_READ_ROLES, "list alerts")
        alerts, token = await list_page(
            self._store, filter_text, ALERT_FILTER_FIELDS, page_size, page_token, _scope(organization)
        )
        return AlertPage(alerts, token)

    async def clear(self, name: str, note: str) -> Alert:
        organization, alert_id = parse_alert_name(name)
        principal = current_principal()
        _authorize(principal, organization, name, ALERT_WRITE_ROLES, "clear alerts")
        current = await self._find(organization, alert_id)
        if current.state is AlertState.CLEARED:
            raise FailedPrecondition(
                f"alert {name!r} is already cleared", reason="ALREADY_CLEARED", metadata={"alert": name}
            )
        cleared = await replace_checked(self._store, current.cleared(principal.subject, note, now()), current)
        await audit(self._trail, organization, name, description="alert cleared")
        return cleared

    async def _find(self, organization: str, alert_id: str) -> Alert:
        alert = await self._store.get(alert_id)
        # Ids are unique across organizations; one under another organization's name does not exist here.
        if alert is None or alert.organization != organization:
            name = organization + ALERTS + alert_id
            raise NotFound(f"alert {name!r} does not exist", reason="ALERT_NOT_FOUND", metadata={"alert": name})
        return alert


class AlertRuleService:
    def __init__(
        self,
        store: ResourceStore[AlertRule],
        states: RuleStateStore,
        devices: DeviceDirectory,
        cache: RuleCache,
        trail: AuditTrail,
    ) -> None:
        self._store = store
        self._states = states
        self._devices = devices
        self._cache = cache
        self._trail = trail

    async def create(self, parent: str, details: RuleDetails) -> AlertRule:
        organization = parse_parent(parent)
        _authorize(current_principal(), organization, organization, RULE_WRITE_ROLES, "create alert rules")
        rule = new_rule(organization, details, now())
        if rule.device:
            await require_device_of(self._devices, rule.device, organization, "alert_rule.device")
        existing = await self._store.list(
            [Condition("organization", True, organization)], None, MAX_RULES_PER_ORGANIZATION
        )
        if len(existing) >= MAX_RULES_PER_ORGANIZATION:
            raise FailedPrecondition(
                f"{organization!r} has {MAX_RULES_PER_ORGANIZATION} alert rules, the most it may have",
                reason="ALERT_RULE_LIMIT_REACHED",
                metadata={"organization": organization, "limit": str(MAX_RULES_PER_ORGANIZATION)},
            )
        await self._store.insert(rule)
        self._cache.forget(organization)
        await audit(self._trail, organization, rule.name, description="alert rule created")
        return rule

    async def get(self, name: str) -> AlertRule:
        organization, rule_id = parse_rule_name(name)
        _authorize(current_principal(), organization, name, RULE_READ_ROLES, "read alert rules")
        return await self._find(organization, rule_id)

    async def list_rules(self, parent: str, filter_text: str, page_size: int, page_token: str) -> AlertRulePage:
        organization = parse_parent(parent, allow_all=True)
        _authorize(current_principal(), organization, organization, RULE_READ_ROLES, "list alert rules")
        rules, token = await list_page(
            self._store, filter_text, RULE_FILTER_FIELDS, page_size, page_token, _scope(organization)
        )
        return AlertRulePage(rules, token)

    async def update(self, name: str, changes: RuleDetails, mask: list[str], etag: str) -> AlertRule:
        organization, rule_id = parse_rule_name(name, "alert_rule.name")
        _authorize(current_principal(), organization, name, RULE_WRITE_ROLES, "update alert rules")
        fields = resolve_update_mask(mask, RULE_UPDATABLE_FIELDS, "alert_rule")
        current = await self._find(organization, rule_id)
        check_etag(current.id, current.revision, etag)
        updated = current.updated(changes, fields, now())
        if "device" in fields and updated.device:
            await require_device_of(self._devices, updated.device, organization, "alert_rule.device")
        updated = await replace_checked(self._store, updated, current)
        self._cache.forget(organization)
        await audit(self._trail, organization, name, description=f"alert rule updated ({', '.join(sorted(fields))})")
        return updated

    async def delete(self, name: str, etag: str) -> None:
        organization, rule_id = parse_rule_name(name)
        _authorize(current_principal(), organization, name, RULE_WRITE_ROLES, "delete alert rules")
        current = await self._find(organization, rule_id)
        await delete_checked(self._store, current, etag)
        self._cache.forget(organization)
        # Its per-device progress means nothing any more; its alerts stay, as records.
        await self._states.delete_for_rule(current.name)
        await audit(self._trail, organization, name, description="alert rule deleted")

    async def _find(self, organization: str, rule_id: str) -> AlertRule:
        rule = await self._store.get(rule_id)
        if rule is None or rule.organization != organization:
            name = organization + ALERT_RULES + rule_id
            raise NotFound(
                f"alert rule {name!r} does not exist", reason="ALERT_RULE_NOT_FOUND", metadata={"alert_rule": name}
            )
        return rule
