"""Observations: what devices measure, stored once per device message. No I/O.

A device sends observations in batches, each with a device-unique `message_id`. The id of the
stored observation is derived from (device, message_id), so a resent message has the same name,
and the store's unique index on (device, message_id) decides what is new. Items are validated
one by one (`validate`): a bad item is rejected with a reason, the others are stored.

Who owns an observation is decided by the device registry at ingest, never by the sender: the
device's care organization if it has one, else its owner (the "data organization"), and the
patient the device was assigned to then, referred to by opaque name only.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

# Part of this domain's vocabulary; the one definition is shared by the data-plane services.
from medmesh.runtime.directories import DeviceAssignment as DeviceAssignment
from medmesh.runtime.errors import InvalidArgument

DEVICE_PREFIX = "devices/"
COLLECTION = "/observations/"
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ID_PATTERN = re.compile(r"^[a-z0-9-]{1,63}$")
ORGANIZATION_PATTERN = re.compile(r"^organizations/[a-z0-9-]{1,63}$")
PATIENT_PATTERN = re.compile(r"^(organizations/[a-z0-9-]{1,63})/patients/[a-z0-9-]{1,63}$")
MESSAGE_ID_PATTERN = re.compile(r"^[!-~]{1,128}$")  # printable ASCII, no spaces
METRIC_PATTERN = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
UNIT_PATTERN = re.compile(r"^[!-~]{0,64}$")  # UCUM codes are printable ASCII without spaces
SESSION_PATTERN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9/._-]{0,255})?$")

MAX_BATCH = 500
MAX_MULTI_DEVICE_BATCH = 2000  # observations in one BatchWriteObservations, all devices together
MAX_STRING_VALUE = 1024
MAX_WAVEFORM_SAMPLES = 10_000
MAX_SAMPLE_RATE_HZ = 1_000_000.0
# A device clock that was never set reads 1970; a clock far ahead is as wrong. Both would pollute
# every time-range query, so such items are rejected and the device is told why.
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_CLOCK_AHEAD = timedelta(days=1)

# Aggregation bounds: a response stays small and a query cannot scan without limit.
MIN_BIN_SIZE = timedelta(seconds=1)
MAX_CELLS = 10_000  # time bins x metrics
MAX_METRICS = 10


def to_millis(moment: datetime) -> datetime:
    """What BSON dates keep: stored and returned times are equal, and page cursors exact."""
    return moment.astimezone(UTC).replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class Waveform:
    sample_rate_hz: float
    samples: tuple[float, ...]
    start_time: datetime | None = None  # the observation's time when None


@dataclass(frozen=True)
class ObservationDraft:
    """One item as a sender wrote it: nothing checked yet. Exactly one value should be set."""

    message_id: str
    metric: str
    time: datetime | None  # None: unset, or not representable
    unit: str = ""
    session: str = ""
    numeric_value: float | None = None
    boolean_value: bool | None = None
    string_value: str | None = None
    waveform: Waveform | None = None


@dataclass(frozen=True)
class Observation:
    id: str
    device: str  # `devices/{id}`
    message_id: str
    metric: str
    time: datetime
    organization: str  # the data organization
    patient: str  # `organizations/{o}/patients/{p}` or ""
    receive_time: datetime
    unit: str = ""
    session: str = ""
    numeric_value: float | None = None
    boolean_value: bool | None = None
    string_value: str | None = None
    waveform: Waveform | None = None

    @property
    def name(self) -> str:
        return self.device + COLLECTION + self.id


class Outcome(StrEnum):
    STORED = "STORED"
    DUPLICATE = "DUPLICATE"
    REJECTED = "REJECTED"


@dataclass(frozen=True)
class ItemResult:
    outcome: Outcome
    message_id: str
    observation: str = ""  # name, for stored and duplicate items
    reason: str = ""  # for rejected items
    description: str = ""


@dataclass(frozen=True)
class Rejection:
    reason: str
    description: str


@dataclass(frozen=True)
class BatchResult:
    results: list[ItemResult]

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)


@dataclass(frozen=True)
class Parent:
    """Whose observations a query reads: one device's, or one patient's (in the patient's organization)."""

    device: str = ""
    patient: str = ""
    organization: str = ""  # the patient's organization; "" for a device

    @property
    def name(self) -> str:
        return self.device or self.patient


def observation_id(device: str, message_id: str) -> str:
    """Deterministic: the same message of the same device always has the same id (128 bits)."""
    return hashlib.sha256(f"{device}\n{message_id}".encode()).hexdigest()[:32]


def parse_device(name: str, field: str = "parent") -> str:
    """`devices/{id}` -> the same, checked."""
    if name.startswith(DEVICE_PREFIX) and DEVICE_ID_PATTERN.match(name[len(DEVICE_PREFIX) :]):
        return name
    raise InvalidArgument.for_field(field, f"must look like devices/{{device}}, got {name!r}", reason="INVALID_NAME")


def parse_name(name: str, field: str = "name") -> tuple[str, str]:
    """`devices/{d}/observations/{o}` -> (`devices/{d}`, o)."""
    device, separator, observation = name.rpartition(COLLECTION)
    if separator and ID_PATTERN.match(observation):
        try:
            return parse_device(device, field), observation
        except InvalidArgument:
            pass
    raise InvalidArgument.for_field(
        field,
        f"must look like devices/{{device}}/observations/{{observation}}, got {name!r}",
        reason="INVALID_NAME",
    )


def parse_parent(parent: str, field: str = "parent") -> Parent:
    """`devices/{d}` or `organizations/{o}/patients/{p}`."""
    if parent.startswith(DEVICE_PREFIX):
        return Parent(device=parse_device(parent, field))
    match = PATIENT_PATTERN.match(parent)
    if match:
        return Parent(patient=parent, organization=match.group(1))
    raise InvalidArgument.for_field(
        field,
        f"must look like devices/{{device}} or organizations/{{organization}}/patients/{{patient}}, got {parent!r}",
        reason="INVALID_NAME",
    )


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _check(draft: ObservationDraft, at: datetime) -> Rejection | None:
    """The first thing wrong with an item, or None; descriptions name the field, as a BadRequest would."""
    if not MESSAGE_ID_PATTERN.match(draft.message_id):
        return _invalid("message_id", "must be 1 to 128 printable ASCII characters without spaces")
    if not METRIC_PATTERN.match(draft.metric):
        return _invalid("metric", "must match ^[a-z][a-z0-9_.]{0,63}$, for example heart_rate")
    if draft.time is None:
        return _invalid("time", "must be set to a valid time")
    if draft.time < EARLIEST_TIME:
        return _invalid("time", "is before 2000-01-01: is the device clock set?")
    if draft.time > at + MAX_CLOCK_AHEAD:
        return _invalid("time", "is more than a day ahead of the server clock")
    if not UNIT_PATTERN.match(draft.unit):
        return _invalid("unit", "must be a UCUM code: at most 64 printable ASCII characters without spaces")
    if not SESSION_PATTERN.match(draft.session):
        return _invalid("session", "must be a name of at most 256 letters, digits and /._-")
    values = (draft.numeric_value, draft.boolean_value, draft.string_value, draft.waveform)
    if sum(v is not None for v in values) != 1:
        return _invalid("value", "exactly one of numeric_value, boolean_value, string_value, waveform must be set")
    if draft.numeric_value is not None and not _finite(draft.numeric_value):
        return _invalid("numeric_value", "must be a finite number")
    if draft.string_value is not None and len(draft.string_value) > MAX_STRING_VALUE:
        return _invalid("string_value", f"must be at most {MAX_STRING_VALUE} characters")
    if draft.waveform is not None:
        return _check_waveform(draft.waveform)
    return None


def _check_waveform(waveform: Waveform) -> Rejection | None:
    rate = waveform.sample_rate_hz
    if not (_finite(rate) and 0 < rate <= MAX_SAMPLE_RATE_HZ):
        return _invalid("waveform.sample_rate_hz", f"must be positive and at most {MAX_SAMPLE_RATE_HZ:.0f}")
    if not 1 <= len(waveform.samples) <= MAX_WAVEFORM_SAMPLES:
        return _invalid("waveform.samples", f"must hold 1 to {MAX_WAVEFORM_SAMPLES} samples")
    if not all(_finite(s) for s in waveform.samples):
        return _invalid("waveform.samples", "must all be finite numbers")
    if waveform.start_time is not None and waveform.start_time < EARLIEST_TIME:
        return _invalid("waveform.start_time", "is before 2000-01-01: is the device clock set?")
    return None


def _invalid(field_name: str, description: str) -> Rejection:
    return Rejection("INVALID_FIELD", f"{field_name}: {description}")


def validate(draft: ObservationDraft, assignment: DeviceAssignment, at: datetime) -> Observation | Rejection:
    """The observation to store, owned as `assignment` says now and received `at`; or why not."""
    rejection = _check(draft, at)
    if rejection is not None:
        return rejection
    assert draft.time is not None  # checked above
    waveform = draft.waveform
    if waveform is not None:
        start = to_millis(waveform.start_time) if waveform.start_time is not None else None
        waveform = Waveform(float(waveform.sample_rate_hz), tuple(float(s) for s in waveform.samples), start)
    return Observation(
        id=observation_id(assignment.device, draft.message_id),
        device=assignment.device,
        message_id=draft.message_id,
        metric=draft.metric,
        time=to_millis(draft.time),
        organization=assignment.data_organization,
        patient=assignment.patient,
        receive_time=to_millis(at),
        unit=draft.unit,
        session=draft.session,
        numeric_value=None if draft.numeric_value is None else float(draft.numeric_value),
        boolean_value=draft.boolean_value,
        string_value=draft.string_value,
        waveform=waveform,
    )


def rejected_all(drafts: Sequence[ObservationDraft], reason: str, description: str) -> BatchResult:
    return BatchResult([ItemResult(Outcome.REJECTED, d.message_id, "", reason, description) for d in drafts])


# --- aggregation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AggregationRequest:
    metrics: tuple[str, ...]
    start_time: datetime
    end_time: datetime
    bin_size: timedelta

    @property
    def bin_count(self) -> int:
        return -(-(self.end_time - self.start_time) // self.bin_size)  # ceiling

    def bin_of(self, moment: datetime) -> int:
        return (moment - self.start_time) // self.bin_size

    def bin_start(self, index: int) -> datetime:
        return self.start_time + index * self.bin_size


def aggregation_request(
    metrics: Iterable[str], start_time: datetime | None, end_time: datetime | None, bin_size: timedelta | None
) -> AggregationRequest:
    """Checks what the proto's rules check too (the service must not depend on the interceptor), plus the bounds."""
    names = tuple(metrics)
    if not 1 <= len(names) <= MAX_METRICS or len(set(names)) != len(names):
        raise InvalidArgument.for_field("metrics", f"name 1 to {MAX_METRICS} different metrics")
    for name in names:
        if not METRIC_PATTERN.match(name):
            raise InvalidArgument.for_field("metrics", f"{name!r} is not a metric name")
    if start_time is None or end_time is None:
        raise InvalidArgument.for_field("start_time" if start_time is None else "end_time", "is required")
    if end_time <= start_time:
        raise InvalidArgument.for_field("end_time", "must be after start_time")
    if bin_size is None or bin_size < MIN_BIN_SIZE:
        raise InvalidArgument.for_field("bin_size", "must be at least 1s")
    if bin_size % timedelta(milliseconds=1):
        raise InvalidArgument.for_field("bin_size", "must be whole milliseconds")
    request = AggregationRequest(names, start_time, end_time, bin_size)
    if request.bin_count * len(names) > MAX_CELLS:
        raise InvalidArgument.for_field(
            "bin_size",
            f"{request.bin_count} bins x {len(names)} metrics exceeds {MAX_CELLS}: use larger bins or a shorter range",
            reason="TOO_MANY_BINS",
        )
    return request


@dataclass
class RunningStatistics:
    """Welford's online algorithm: one pass, numerically stable, population variance."""

    count: int = 0
    minimum: float = math.inf
    maximum: float = -math.inf
    mean: float = 0.0
    _m2: float = field(default=0.0, repr=False)

    def add(self, value: float) -> None:
        self.count += 1
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)
        delta = value - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (value - self.mean)

    @property
    def standard_deviation(self) -> float:
        return math.sqrt(max(self._m2, 0.0) / self.count) if self.count else 0.0


@dataclass(frozen=True)
class ObservationBin:
    start_time: datetime
    metric: str
    count: int
    min: float
    max: float
    mean: float
    standard_deviation: float


class Aggregator:
    """Folds (metric, time, value) points into per-(bin, metric) statistics."""

    def __init__(self, request: AggregationRequest) -> None:
        self._request = request
        self._cells: dict[tuple[int, str], RunningStatistics] = {}

    def add(self, metric: str, moment: datetime, value: float) -> None:
        request = self._request
        if metric not in request.metrics or not request.start_time <= moment < request.end_time:
            return  # the query already excludes these; a fold that cannot be fooled costs nothing
        key = (request.bin_of(moment), metric)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = RunningStatistics()
        cell.add(value)

    def bins(self) -> list[ObservationBin]:
        return [
            ObservationBin(
                self._request.bin_start(index),
                metric,
                cell.count,
                cell.minimum,
                cell.maximum,
                cell.mean,
                cell.standard_deviation,
            )
            for (index, metric), cell in sorted(self._cells.items())
        ]
