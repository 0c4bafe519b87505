"""Use cases of the observation service: ingest, and who may read which observations.

Ingest resolves the device's assignment once per batch (the data organization and patient come
from the registry, never from the sender), validates item by item, stores the valid ones with
one unordered insert whose duplicate-key errors mean DUPLICATE, then hands the numeric values
just stored to alert evaluation (best effort: see `alerts`).

Reads are scoped server-side to the caller's organization (platform admins: all), as a
condition of every query. A device name carries no organization and a device can move between
care organizations, so a device's observations are read as "those of this device owned by your
organization": each observation stays with the organization that owned the data when it was
stored. A patient name carries its organization, which is checked before anything is read
(PERMISSION_DENIED before NOT_FOUND).

Audit: one event per public ingest batch. Internal ingest (the MQTT adapter, device telemetry)
is not audited per batch: at device telemetry rates that would double the writes and bury the
trail; the device's connection and configuration changes are audited where they happen. Reads
of observations are not audited: they hold no PHI (patients appear as opaque names only).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import Principal, Role, current_principal
from medmesh.runtime.directories import DeviceAssignment, DeviceDirectory
from medmesh.runtime.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied
from medmesh.runtime.filtering import Comparison, Condition, Converter, parse_filter, rfc3339_timestamp
from medmesh.runtime.pagination import encode_token, page_request
from medmesh.runtime.resources import now
from services.observation.alerts import AlertEvaluator, ObservationSample
from services.observation.domain import (
    MAX_BATCH,
    MAX_MULTI_DEVICE_BATCH,
    METRIC_PATTERN,
    ORGANIZATION_PATTERN,
    PATIENT_PATTERN,
    AggregationRequest,
    Aggregator,
    BatchResult,
    ItemResult,
    Observation,
    ObservationBin,
    ObservationDraft,
    Outcome,
    Parent,
    Rejection,
    aggregation_request,
    parse_device,
    parse_name,
    parse_parent,
    rejected_all,
    validate,
)
from services.observation.repository import Cursor

READERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR)
# Public ingest, on top of these: any service account of the data organization (an integrator).
WRITERS = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.OPERATOR)
SERVICE_ACCOUNT = re.compile(r"^organizations/[a-z0-9-]{1,63}/serviceAccounts/[^/]+$")
# The most values one aggregation may read: bounds the time and memory of a query computed in
# Python (FerretDB v1 cannot compute the statistics; see the repository).
MAX_AGGREGATED_VALUES = 200_000


def _metric(written: str) -> str:
    if not METRIC_PATTERN.match(written):
        raise ValueError("must be a metric name such as heart_rate")
    return written


FILTER_FIELDS: dict[str, tuple[str, Converter]] = {
    "metric": ("metric", _metric),
    "session": ("session", str),
    "time": ("time", rfc3339_timestamp),
}


class ObservationStore(Protocol):
    """What the service needs of its repository; ObservationRepository and the unit tests' fake provide it."""

    async def insert_batch(self, observations: Sequence[Observation]) -> list[bool]: ...
    async def get(self, observation_id: str) -> Observation | None: ...
    async def list_observations(
        self, conditions: Sequence[Condition], after: Cursor | None, limit: int
    ) -> list[Observation]: ...
    def numeric_values(
        self, conditions: Sequence[Condition], metrics: Sequence[str], limit: int
    ) -> AsyncIterator[tuple[str, datetime, float]]: ...
    async def latest(self, device: str, organization: str | None) -> list[Observation]: ...


@dataclass(frozen=True)
class ObservationPage:
    observations: list[Observation]
    next_page_token: str


def encode_cursor(observation: Observation) -> str:
    millis = int(observation.time.timestamp() * 1000)  # times are whole milliseconds
    return f"{millis}:{observation.id}"


def decode_cursor(after: str) -> Cursor:
    millis, separator, observation_id = after.partition(":")
    try:
        if not separator or not observation_id:
            raise ValueError("malformed")
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(millis)), observation_id
    except (ValueError, OverflowError) as error:
        raise InvalidArgument.for_field(
            "page_token", "is not a token this service issued", reason="INVALID_PAGE_TOKEN"
        ) from error


def _is_service_account(principal: Principal) -> bool:
    return bool(SERVICE_ACCOUNT.match(principal.subject))


def _require_writer(principal: Principal) -> None:
    if principal.is_internal or principal.role in WRITERS:
        return
    if _is_service_account(principal) and principal.role is not Role.PATIENT:
        return
    principal.require_role(*WRITERS, action="store observations")


def _assignment_problem(assignment: DeviceAssignment) -> str:
    """What makes an assignment unusable as an owner of data ("" if nothing)."""
    if not ORGANIZATION_PATTERN.match(assignment.data_organization):
        return "the device belongs to no organization"
    if assignment.patient and not PATIENT_PATTERN.match(assignment.patient):
        return "the device's patient assignment is not a patient name"
    return ""


class ObservationService:
    def __init__(
        self,
        store: ObservationStore,
        devices: DeviceDirectory,
        alerts: AlertEvaluator,
        trail: AuditTrail,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self._store = store
        self._devices = devices
        self._alerts = alerts
        self._trail = trail
        self._clock = clock

    # --- ingest -------------------------------------------------------------------------------

    async def write(self, device: str, drafts: Sequence[ObservationDraft]) -> BatchResult:
        """Internal ingest from the MQTT adapter: an unknown device gets every item rejected."""
        return (await self.write_many([(device, drafts)]))[0]

    async def write_many(self, batches: Sequence[tuple[str, Sequence[ObservationDraft]]]) -> list[BatchResult]:
        """Internal ingest of several devices' batches in one durable write, answered per batch."""
        principal = current_principal()
        # The authenticator admits only the mesh credential here; this guards against wiring mistakes.
        if not principal.is_internal:
            raise PermissionDenied("observations from devices come through the MQTT adapter", reason="INTERNAL_ONLY")
        devices = [parse_device(device, "device") for device, _ in batches]
        for _, drafts in batches:
            _require_batch_size(drafts)
        if sum(len(drafts) for _, drafts in batches) > MAX_MULTI_DEVICE_BATCH:
            raise InvalidArgument.for_field("requests", f"at most {MAX_MULTI_DEVICE_BATCH} observations in all")
        unique = list(dict.fromkeys(devices))
        found = await asyncio.gather(*(self._devices.assignment(device) for device in unique))
        assignments = dict(zip(unique, found, strict=True))
        at = self._clock()
        checked: list[list[Observation | Rejection] | BatchResult] = []
        for device, (_, drafts) in zip(devices, batches, strict=True):
            assignment = assignments[device]
            if assignment is None:
                checked.append(rejected_all(drafts, "UNKNOWN_DEVICE", f"device {device!r} is not registered"))
            elif problem := _assignment_problem(assignment):
                checked.append(rejected_all(drafts, "DEVICE_NOT_ASSIGNED", problem))
            else:
                checked.append([validate(draft, assignment, at) for draft in drafts])
        valid = [o for items in checked if isinstance(items, list) for o in items if isinstance(o, Observation)]
        stored = iter(await self._store.insert_batch(valid))
        fresh: list[Observation] = []
        results = [
            items if isinstance(items, BatchResult) else _answers(drafts, items, stored, fresh)
            for (_, drafts), items in zip(batches, checked, strict=True)
        ]
        await self._evaluate_alerts(fresh)
        return results

    async def batch_create(self, parent: str, drafts: Sequence[ObservationDraft]) -> BatchResult:
        """Public ingest: the caller must be allowed to write for the device's data organization."""
        principal = current_principal()
        device = parse_device(parent)
        _require_writer(principal)
        _require_batch_size(drafts)
        assignment = await self._devices.assignment(device)
        if assignment is None:
            if not principal.sees_every_organization:
                # Device names carry no organization: "no such device" would tell other tenants what exists.
                raise _denied(principal, device)
            raise NotFound(f"device {device!r} does not exist", reason="DEVICE_NOT_FOUND", metadata={"device": device})
        principal.require_access(assignment.data_organization, device)
        problem = _assignment_problem(assignment)
        if problem:
            violations = [FieldViolation("parent", problem)]
            raise InvalidArgument(f"{device}: {problem}", reason="DEVICE_NOT_ASSIGNED", field_violations=violations)
        result = await self._ingest(assignment, drafts)
        await audit(
            self._trail,
            assignment.data_organization,
            device,
            description=(
                f"observations: {result.count(Outcome.STORED)} stored, {result.count(Outcome.DUPLICATE)} duplicate,"
                f" {result.count(Outcome.REJECTED)} rejected"
            ),
        )
        return result

    async def _ingest(self, assignment: DeviceAssignment, drafts: Sequence[ObservationDraft]) -> BatchResult:
        at = self._clock()
        checked = [validate(draft, assignment, at) for draft in drafts]
        valid = [item for item in checked if isinstance(item, Observation)]
        stored = iter(await self._store.insert_batch(valid))
        fresh: list[Observation] = []
        result = _answers(drafts, checked, stored, fresh)
        await self._evaluate_alerts(fresh)
        return result

    async def _evaluate_alerts(self, fresh: Sequence[Observation]) -> None:
        # Only what was stored now: a resent batch does not re-raise alerts.
        await self._alerts.evaluate(
            [
                ObservationSample(o.device, o.organization, o.patient, o.metric, o.numeric_value, o.time)
                for o in fresh
                if o.numeric_value is not None
            ]
        )

    # --- reads --------------------------------------------------------------------------------

    async def get(self, name: str) -> Observation:
        device, observation_id = parse_name(name)
        principal = current_principal()
        principal.require_role(*READERS, action="read observations")
        observation = await self._store.get(observation_id)
        if observation is None or observation.device != device or not principal.can_access(observation.organization):
            if not principal.sees_every_organization:
                # Observation names carry no organization: the same answer for "not yours" and "none".
                raise _denied(principal, name)
            raise NotFound(
                f"observation {name!r} does not exist", reason="OBSERVATION_NOT_FOUND", metadata={"observation": name}
            )
        return observation

    async def list_observations(
        self, parent: str, filter_text: str, page_size: int, page_token: str
    ) -> ObservationPage:
        scope = self._scope(parse_parent(parent), "list observations")
        conditions = [*scope, *parse_filter(filter_text, FILTER_FIELDS)]
        # Tokens are bound to the parent, the filter and the caller's scope.
        query = f"{parent}\x00{filter_text}\x00{scope!r}"
        page = page_request(page_size, page_token, query)
        after = decode_cursor(page.after) if page.after is not None else None
        items = await self._store.list_observations(conditions, after, page.size + 1)
        if len(items) <= page.size:
            return ObservationPage(items, "")
        kept = items[: page.size]
        return ObservationPage(kept, encode_token(encode_cursor(kept[-1]), query))

    async def aggregate(
        self,
        parent: str,
        metrics: Sequence[str],
        start_time: datetime | None,
        end_time: datetime | None,
        bin_size: timedelta | None,
    ) -> list[ObservationBin]:
        scope = self._scope(parse_parent(parent), "aggregate observations")
        request = aggregation_request(metrics, start_time, end_time, bin_size)
        return await self._aggregate(scope, request)

    async def _aggregate(self, scope: list[Condition], request: AggregationRequest) -> list[ObservationBin]:
        conditions = [
            *scope,
            Condition("time", True, request.start_time, Comparison.GREATER_OR_EQUAL),
            Condition("time", True, request.end_time, Comparison.LESS),
        ]
        aggregator = Aggregator(request)
        read = 0
        async for metric, moment, value in self._store.numeric_values(
            conditions, request.metrics, MAX_AGGREGATED_VALUES + 1
        ):
            read += 1
            if read > MAX_AGGREGATED_VALUES:
                raise _too_many_values()
            aggregator.add(metric, moment, value)
        return aggregator.bins()

    async def latest(self, parent: str) -> list[Observation]:
        device = parse_device(parent)
        principal = current_principal()
        principal.require_role(*READERS, action="read observations")
        organization = None if principal.sees_every_organization else principal.organization
        newest: dict[str, Observation] = {}
        # Platform admins may see one metric in several organizations (a device that moved): the newest wins.
        for observation in await self._store.latest(device, organization):
            current = newest.get(observation.metric)
            if current is None or (observation.time, observation.id) > (current.time, current.id):
                newest[observation.metric] = observation
        return [newest[metric] for metric in sorted(newest)]

    def _scope(self, parent: Parent, action: str) -> list[Condition]:
        """The conditions that confine a read to `parent` and to what the caller may see; checks access first."""
        principal = current_principal()
        if parent.patient:
            principal.require_access(parent.organization, parent.patient)
            principal.require_role(*READERS, action=action)
            return [Condition("organization", True, parent.organization), Condition("patient", True, parent.patient)]
        principal.require_role(*READERS, action=action)
        scope = [Condition("device", True, parent.device)]
        if not principal.sees_every_organization:
            scope.insert(0, Condition("organization", True, principal.organization))
        return scope


def _too_many_values() -> InvalidArgument:
    return InvalidArgument(
        f"more than {MAX_AGGREGATED_VALUES} values in the range: narrow it or name fewer metrics",
        reason="TOO_MANY_VALUES",
        field_violations=[FieldViolation("end_time", f"the range holds over {MAX_AGGREGATED_VALUES} values")],
    )


def _answers(
    drafts: Sequence[ObservationDraft],
    checked: Sequence[Observation | Rejection],
    stored: Iterator[bool],
    fresh: list[Observation],
) -> BatchResult:
    """Per item: rejected by validation, or stored now (added to `fresh`), or stored before."""
    results: list[ItemResult] = []
    for draft, item in zip(drafts, checked, strict=True):
        if not isinstance(item, Observation):
            results.append(ItemResult(Outcome.REJECTED, draft.message_id, "", item.reason, item.description))
        elif next(stored):
            results.append(ItemResult(Outcome.STORED, item.message_id, item.name))
            fresh.append(item)
        else:
            results.append(ItemResult(Outcome.DUPLICATE, item.message_id, item.name))
    return BatchResult(results)


def _require_batch_size(drafts: Sequence[ObservationDraft]) -> None:
    if not 1 <= len(drafts) <= MAX_BATCH:
        raise InvalidArgument.for_field("observations", f"send 1 to {MAX_BATCH} observations per batch")


def _denied(principal: Principal, resource: str) -> PermissionDenied:
    return PermissionDenied(
        f"{principal.subject} may not access {resource}",
        reason="ORGANIZATION_ACCESS_DENIED",
        metadata={"resource": resource},
    )
