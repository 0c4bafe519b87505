"""Alerts, threshold rules and the evaluation of rules against observations. No I/O.

An `Alert` is owned by the organization that owns the data it is about (a device's care
organization, else its owner). An `AlertRule` watches one metric of the devices of its
organization; its progress per device is a `RuleState`, advanced one sample at a time by
`step`, a pure function: the service does the reads and writes around it.

Only one alert per (rule, device) may be ACTIVE. That is not left to the rule state (whose
writes are last-writer-wins under concurrency) but to a unique index over `Alert.active_key`:
an active rule alert's key is `rule_key(rule, device)`, every other alert's key is its own
id, so a second active alert for the same rule and device cannot be inserted.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

# Part of this domain's vocabulary; the one definition is shared by the data-plane services.
from medmesh.runtime.directories import DeviceAssignment as DeviceAssignment
from medmesh.runtime.errors import InvalidArgument
from medmesh.runtime.resources import etag_of

ALL_ORGANIZATIONS = "organizations/-"
ALERTS = "/alerts/"
ALERT_RULES = "/alertRules/"
ID_PATTERN = re.compile(r"^[a-z0-9-]{1,63}$")
ORGANIZATION_PATTERN = re.compile(r"^organizations/[a-z0-9-]{1,63}$")
DEVICE_PATTERN = re.compile(r"^devices/[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PATIENT_PATTERN = re.compile(r"^(organizations/[a-z0-9-]{1,63})/patients/[a-z0-9-]{1,63}$")
RULE_NAME_PATTERN = re.compile(r"^organizations/[a-z0-9-]{1,63}/alertRules/[a-z0-9-]{1,63}$")
METRIC_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
MAX_TITLE = 200
MAX_DESCRIPTION = 2000
MAX_NOTE = 1000
MAX_RULE_DURATION = timedelta(days=1)
RULE_UPDATABLE_FIELDS = (
    "display_name",
    "metric",
    "operator",
    "threshold",
    "duration",
    "severity",
    "device",
    "enabled",
    "clear_automatically",
)


class Severity(StrEnum):
    CRITICAL = "CRITICAL"
    MAJOR = "MAJOR"
    MINOR = "MINOR"
    INFO = "INFO"


class AlertState(StrEnum):
    ACTIVE = "ACTIVE"
    CLEARED = "CLEARED"


class Operator(StrEnum):
    """`value OP threshold`; the values are the symbols, as shown in titles."""

    GREATER_THAN = ">"
    GREATER_THAN_OR_EQUAL = ">="
    LESS_THAN = "<"
    LESS_THAN_OR_EQUAL = "<="
    EQUAL = "=="
    NOT_EQUAL = "!="

    def holds(self, value: float, threshold: float) -> bool:
        if self is Operator.GREATER_THAN:
            return value > threshold
        if self is Operator.GREATER_THAN_OR_EQUAL:
            return value >= threshold
        if self is Operator.LESS_THAN:
            return value < threshold
        if self is Operator.LESS_THAN_OR_EQUAL:
            return value <= threshold
        if self is Operator.EQUAL:
            return value == threshold
        return value != threshold


def new_id() -> str:
    """12 hex digits of milliseconds, then 12 random: ids sort by creation time and never collide in practice."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def to_millis(moment: datetime) -> datetime:
    """What BSON keeps, so a time read back equals the one compared before it was stored."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def rule_key(rule: str, device: str) -> str:
    """Identifies a (rule, device) pair: the rule state's id and an active rule alert's `active_key`."""
    return f"{rule}|{device}"


def format_number(value: float) -> str:
    return f"{value:g}"


def format_duration(duration: timedelta) -> str:
    seconds = duration.total_seconds()
    return f"{seconds:g}s"


# --- alerts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    id: str  # time-ordered: newest first is descending ids
    organization: str  # owner, `organizations/{o}`: the data organization of its subject
    device: str  # `devices/{d}` or ""
    patient: str  # opaque `organizations/{o}/patients/{p}` or ""
    severity: Severity
    state: AlertState
    title: str
    description: str
    metric: str  # "" for alerts raised by hand
    rule: str  # `organizations/{o}/alertRules/{r}` or "" for alerts raised by hand
    raise_time: datetime
    clear_time: datetime | None = None
    cleared_by: str = ""
    clear_note: str = ""
    revision: int = 1

    @property
    def name(self) -> str:
        return self.organization + ALERTS + self.id

    @property
    def active_key(self) -> str:
        """Unique over all alerts: (rule, device) while a rule's alert is active, else the id."""
        if self.state is AlertState.ACTIVE and self.rule:
            return rule_key(self.rule, self.device)
        return self.id

    def cleared(self, by: str, note: str, at: datetime) -> Alert:
        return replace(
            self,
            state=AlertState.CLEARED,
            clear_time=at,
            cleared_by=by,
            clear_note=require_text(note, MAX_NOTE, "note"),
            revision=self.revision + 1,
        )


@dataclass(frozen=True)
class AlertDetails:
    """What a person writes when raising an alert by hand."""

    device: str = ""
    patient: str = ""
    severity: Severity | None = None
    title: str = ""
    description: str = ""


def new_alert(organization: str, details: AlertDetails, at: datetime, alert_id: str = "") -> Alert:
    """A validated alert raised by hand in `organization`."""
    if not details.device and not details.patient:
        raise InvalidArgument.for_field(
            "alert.device", "an alert needs a device, a patient or both", reason="ALERT_SUBJECT_MISSING"
        )
    if details.device:
        require_device(details.device, "alert.device")
    if details.patient:
        require_patient_of(details.patient, organization, "alert.patient")
    title = require_text(details.title, MAX_TITLE, "alert.title")
    if not title:
        raise InvalidArgument.for_field("alert.title", "is required")
    return Alert(
        id=alert_id or new_id(),
        organization=organization,
        device=details.device,
        patient=details.patient,
        severity=require_severity(details.severity, "alert.severity"),
        state=AlertState.ACTIVE,
        title=title,
        description=require_text(details.description, MAX_DESCRIPTION, "alert.description"),
        metric="",
        rule="",
        raise_time=at,
    )


# --- rules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertRule:
    id: str
    organization: str
    display_name: str
    metric: str
    operator: Operator
    threshold: float
    duration: timedelta  # how long, in observation time, the condition must hold; whole milliseconds
    severity: Severity
    device: str  # `devices/{d}`, or "" for every device of the organization
    enabled: bool
    clear_automatically: bool
    create_time: datetime
    update_time: datetime
    revision: int = 1

    @property
    def name(self) -> str:
        return self.organization + ALERT_RULES + self.id

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)

    @property
    def condition(self) -> str:
        """`heart_rate > 120`."""
        return f"{self.metric} {self.operator.value} {format_number(self.threshold)}"

    @property
    def alert_title(self) -> str:
        return self.display_name or self.condition

    def watches(self, device: str) -> bool:
        return self.enabled and (not self.device or self.device == device)

    def updated(self, changes: RuleDetails, fields: set[str], at: datetime) -> AlertRule:
        """Applies the fields of a resolved update mask; the result is validated as a whole."""
        current = RuleDetails(
            display_name=self.display_name,
            metric=self.metric,
            operator=self.operator,
            threshold=self.threshold,
            duration=self.duration,
            severity=self.severity,
            device=self.device,
            enabled=self.enabled,
            clear_automatically=self.clear_automatically,
        )
        merged = replace(current, **{f: getattr(changes, f) for f in fields})
        checked = new_rule(self.organization, merged, self.create_time, self.id)
        return replace(checked, update_time=at, revision=self.revision + 1)


@dataclass(frozen=True)
class RuleDetails:
    """What a caller writes: every field of a create, or the new values of an update's masked fields.

    `None` for `enabled` and `clear_automatically` means "not given", which is true.
    """

    display_name: str = ""
    metric: str = ""
    operator: Operator | None = None
    threshold: float = 0.0
    duration: timedelta = timedelta(0)
    severity: Severity | None = None
    device: str = ""
    enabled: bool | None = None
    clear_automatically: bool | None = None


def new_rule(organization: str, details: RuleDetails, at: datetime, rule_id: str = "") -> AlertRule:
    metric = details.metric.strip()
    if not METRIC_PATTERN.match(metric):
        raise InvalidArgument.for_field("alert_rule.metric", "is required: letters, digits and _ . : / - (at most 128)")
    if details.operator is None:
        raise InvalidArgument.for_field("alert_rule.operator", "is required")
    if not math.isfinite(details.threshold):
        raise InvalidArgument.for_field("alert_rule.threshold", "must be a finite number")
    if details.duration < timedelta(0) or details.duration > MAX_RULE_DURATION:
        raise InvalidArgument.for_field("alert_rule.duration", "must be between 0 and 1 day")
    if details.device:
        require_device(details.device, "alert_rule.device")
    return AlertRule(
        id=rule_id or new_id(),
        organization=organization,
        display_name=require_text(details.display_name, MAX_TITLE, "alert_rule.display_name"),
        metric=metric,
        operator=details.operator,
        threshold=details.threshold,
        duration=timedelta(milliseconds=details.duration // timedelta(milliseconds=1)),
        severity=require_severity(details.severity, "alert_rule.severity"),
        device=details.device,
        enabled=True if details.enabled is None else details.enabled,
        clear_automatically=True if details.clear_automatically is None else details.clear_automatically,
        create_time=at,
        update_time=at,
    )


# --- evaluation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One observed value, as the observation service hands it over."""

    device: str
    organization: str  # the data organization: whose rules apply
    patient: str
    metric: str
    value: float
    time: datetime


@dataclass(frozen=True)
class RuleState:
    """Where one rule stands for one device; kept in the database between batches."""

    rule: str  # `organizations/{o}/alertRules/{r}`
    device: str
    organization: str
    violating_since: datetime | None = None  # start of the current run of violating samples
    last_time: datetime | None = None  # time of the newest sample evaluated
    active_alert: str = ""  # id of the alert raised for the current episode and not yet seen cleared

    @property
    def id(self) -> str:
        return rule_key(self.rule, self.device)


class Action(StrEnum):
    NONE = "NONE"
    RAISE = "RAISE"
    CLEAR = "CLEAR"


def step(rule: AlertRule, state: RuleState, sample: Sample) -> tuple[RuleState, Action]:
    """Advances `state` by one sample of the rule's metric; the action tells the service what to do.

    A violating sample starts (or continues) the window; once the window is `duration` long in
    observation time and no alert is active, RAISE. A sample that does not violate closes the
    window and, if an alert is active and the rule clears automatically, CLEAR. A sample older
    than the newest one evaluated changes nothing (it arrived too late to count).
    """
    if state.last_time is not None and sample.time < state.last_time:
        return state, Action.NONE
    if rule.operator.holds(sample.value, rule.threshold):
        since = state.violating_since or sample.time
        advanced = replace(state, violating_since=since, last_time=sample.time)
        if not state.active_alert and sample.time - since >= rule.duration:
            return advanced, Action.RAISE
        return advanced, Action.NONE
    reset = replace(state, violating_since=None, last_time=sample.time)
    if state.active_alert and rule.clear_automatically:
        return reset, Action.CLEAR
    return reset, Action.NONE


def episode_closed(state: RuleState) -> RuleState:
    """The state once its active alert was found cleared by someone else (a person, usually).

    The window starts again: if the condition still holds, a new alert is raised after the
    rule's duration, so clearing never silences a condition that goes on.
    """
    return replace(state, active_alert="", violating_since=None)


def raised_alert(rule: AlertRule, sample: Sample, alert_id: str = "") -> Alert:
    """The alert a rule raises on `sample`, the one that made the condition hold long enough."""
    held = f" for at least {format_duration(rule.duration)}" if rule.duration else ""
    return Alert(
        id=alert_id or new_id(),
        organization=rule.organization,
        device=sample.device,
        patient=sample.patient,
        severity=rule.severity,
        state=AlertState.ACTIVE,
        title=rule.alert_title,
        description=(
            f"{rule.metric} of {sample.device} was {format_number(sample.value)} "
            f"({rule.condition}){held}; raised by rule {rule.name}"
        ),
        metric=rule.metric,
        rule=rule.name,
        raise_time=sample.time,
    )


def automatic_clear_note(rule: AlertRule, sample: Sample) -> str:
    return f"{rule.metric} was {format_number(sample.value)}: no longer {rule.condition}"


def cleared_by_rule(rule: AlertRule) -> str:
    return f"rule:{rule.id}"


def samples_by_device(samples: Iterable[Sample]) -> list[tuple[tuple[str, str], list[Sample]]]:
    """Groups samples by (organization, device), each group in time order (stable for equal times).

    Samples whose value is not a finite number are dropped: no comparison with them means anything.
    """
    groups: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for sample in samples:
        if math.isfinite(sample.value):
            groups[(sample.organization, sample.device)].append(sample)
    return [(key, sorted(group, key=lambda s: s.time)) for key, group in groups.items()]


def require_sample(sample: Sample, field: str) -> Sample:
    """The shape checks the proto makes, for callers that bypass it; times kept to milliseconds."""
    require_device(sample.device, f"{field}.device")
    if not ORGANIZATION_PATTERN.match(sample.organization):
        raise InvalidArgument.for_field(f"{field}.organization", "must look like organizations/{organization}")
    if sample.patient and not PATIENT_PATTERN.match(sample.patient):
        raise InvalidArgument.for_field(f"{field}.patient", "must look like organizations/{o}/patients/{p}")
    if not sample.metric or len(sample.metric) > 128:
        raise InvalidArgument.for_field(f"{field}.metric", "must have 1 to 128 characters")
    return replace(sample, time=to_millis(sample.time))


# --- names and fields ---------------------------------------------------------------------------


def parse_parent(parent: str, field: str = "parent", *, allow_all: bool = False) -> str:
    """`organizations/{id}` (or `organizations/-` when `allow_all`) -> the same, checked."""
    if ORGANIZATION_PATTERN.match(parent) and (parent != ALL_ORGANIZATIONS or allow_all):
        return parent
    raise InvalidArgument.for_field(
        field, f"must look like organizations/{{organization}}, got {parent!r}", reason="INVALID_NAME"
    )


def _parse_child(name: str, collection: str, field: str) -> tuple[str, str]:
    organization, separator, child_id = name.rpartition(collection)
    valid_parent = ORGANIZATION_PATTERN.match(organization) and organization != ALL_ORGANIZATIONS
    if separator and ID_PATTERN.match(child_id) and valid_parent:
        return organization, child_id
    raise InvalidArgument.for_field(
        field,
        f"must look like organizations/{{organization}}{collection}{{id}}, got {name!r}",
        reason="INVALID_NAME",
    )


def parse_alert_name(name: str, field: str = "name") -> tuple[str, str]:
    """`organizations/{o}/alerts/{a}` -> (`organizations/{o}`, a)."""
    return _parse_child(name, ALERTS, field)


def parse_rule_name(name: str, field: str = "name") -> tuple[str, str]:
    """`organizations/{o}/alertRules/{r}` -> (`organizations/{o}`, r)."""
    return _parse_child(name, ALERT_RULES, field)


def require_device(device: str, field: str) -> str:
    if not DEVICE_PATTERN.match(device):
        raise InvalidArgument.for_field(field, f"must look like devices/{{device}}, got {device!r}")
    return device


def require_patient_of(patient: str, organization: str, field: str) -> str:
    """A patient name of `organization`: alerts live with the organization that owns the patient's data."""
    match = PATIENT_PATTERN.match(patient)
    if not match:
        raise InvalidArgument.for_field(field, "must look like organizations/{organization}/patients/{patient}")
    if match.group(1) != organization:
        raise InvalidArgument.for_field(
            field, f"must be a patient of {organization}", reason="PATIENT_NOT_IN_ORGANIZATION"
        )
    return patient


def require_severity(severity: Severity | None, field: str) -> Severity:
    if severity is None:
        raise InvalidArgument.for_field(field, "is required: CRITICAL, MAJOR, MINOR or INFO")
    return severity


def require_text(text: str, limit: int, field: str) -> str:
    text = text.strip()
    if len(text) > limit:
        raise InvalidArgument.for_field(field, f"at most {limit} characters")
    return text
