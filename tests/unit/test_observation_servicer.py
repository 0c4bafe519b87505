"""The observation servicers: protobuf <-> domain, and the whole call path through the shared interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from grpc_status import rpc_status

from medmesh.observation.v1 import observation_service_pb2 as pb
from medmesh.observation.v1 import observation_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import INTERNAL_HEADER, Authenticator, Principal, Role, TokenVerifier
from medmesh.runtime.interceptors import RequestInterceptor
from medmesh.runtime.protoconv import timestamp
from services.observation.domain import DeviceAssignment, Observation, ObservationDraft, Waveform, observation_id
from services.observation.service import ObservationService
from services.observation.servicer import (
    INTERNAL_METHODS,
    ObservationInternalServicer,
    ObservationServicer,
    draft_from_pb,
    to_pb,
)
from tests.rich_status import unpack_details
from tests.unit.test_observation_fakes import FakeDeviceDirectory, InMemoryObservationStore, RecordingAlertEvaluator

ORG_A = "organizations/a"
DEVICE = "devices/SN-1"
PATIENT = f"{ORG_A}/patients/p1"
AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
INTERNAL_TOKEN = "mesh-credential"


def stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    return timestamp(moment)


# --- conversions ----------------------------------------------------------------------------------


def test_draft_from_pb_keeps_the_one_value_set() -> None:
    numeric = draft_from_pb(pb.Observation(message_id="m", metric="hr", time=stamp(AT), numeric_value=0.0, unit="/min"))
    boolean = draft_from_pb(pb.Observation(message_id="m", metric="x", time=stamp(AT), boolean_value=False))
    text = draft_from_pb(pb.Observation(message_id="m", metric="x", time=stamp(AT), string_value=""))
    wave = draft_from_pb(
        pb.Observation(
            message_id="m", metric="ecg", time=stamp(AT), waveform=pb.Waveform(sample_rate_hz=250, samples=[1, 2])
        )
    )
    empty = draft_from_pb(pb.Observation(message_id="m", metric="x"))

    assert numeric == ObservationDraft("m", "hr", AT, unit="/min", numeric_value=0.0)  # zero is a value
    assert boolean == ObservationDraft("m", "x", AT, boolean_value=False)
    assert text == ObservationDraft("m", "x", AT, string_value="")
    assert wave == ObservationDraft("m", "ecg", AT, waveform=Waveform(250.0, (1.0, 2.0), None))
    assert empty == ObservationDraft("m", "x", None)


def test_to_pb() -> None:
    observation = Observation(
        id="abc",
        device=DEVICE,
        message_id="m-1",
        metric="ecg",
        time=AT,
        organization=ORG_A,
        patient=PATIENT,
        receive_time=AT + timedelta(seconds=1),
        unit="mV",
        session="devices/SN-1/sessions/s1",
        waveform=Waveform(250.0, (0.5, -0.5), AT),
    )

    message = to_pb(observation)

    assert message.name == f"{DEVICE}/observations/abc"
    assert (message.message_id, message.metric, message.unit, message.session) == (
        "m-1",
        "ecg",
        "mV",
        "devices/SN-1/sessions/s1",
    )
    assert (message.patient, message.organization) == (PATIENT, ORG_A)
    assert message.time.ToDatetime(tzinfo=UTC) == AT
    assert message.receive_time.ToDatetime(tzinfo=UTC) == AT + timedelta(seconds=1)
    assert message.WhichOneof("value") == "waveform"
    assert (message.waveform.sample_rate_hz, list(message.waveform.samples)) == (250.0, [0.5, -0.5])
    assert message.waveform.start_time.ToDatetime(tzinfo=UTC) == AT
    assert draft_from_pb(message).waveform == observation.waveform


# --- over gRPC, through the shared interceptor ----------------------------------------------------


class HeaderAuthenticator(Authenticator):
    """Internal methods take the real mesh-credential check; for the rest the test names the caller."""

    principals: ClassVar[dict[str, Principal]] = {
        "operator": Principal("organizations/a/users/o", ORG_A, Role.OPERATOR),
        "clinician": Principal("organizations/a/users/c", ORG_A, Role.CLINICIAN),
        "outsider": Principal("organizations/b/users/c", "organizations/b", Role.CLINICIAN),
    }

    def __init__(self) -> None:
        super().__init__(
            TokenVerifier(keys=None),  # type: ignore[arg-type]
            internal_methods=INTERNAL_METHODS,
            internal_token=INTERNAL_TOKEN,
        )

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal | None:
        if method in INTERNAL_METHODS or INTERNAL_HEADER in metadata:
            return await super().authenticate(method, metadata)
        return self.principals[metadata["x-test-caller"]]


@pytest.fixture
async def grpc_observations() -> AsyncIterator[tuple[Any, Any, RecordingAuditTrail, RecordingAlertEvaluator]]:
    trail = RecordingAuditTrail("observation")
    alerts = RecordingAlertEvaluator()
    devices = FakeDeviceDirectory(DeviceAssignment(DEVICE, "organizations/maker", ORG_A, PATIENT))
    service = ObservationService(
        InMemoryObservationStore(), devices, alerts, trail, clock=lambda: AT + timedelta(hours=1)
    )
    server = grpc.aio.server(interceptors=[RequestInterceptor("observation.medmesh", HeaderAuthenticator())])
    pb_grpc.add_ObservationServiceServicer_to_server(ObservationServicer(service), server)  # type: ignore[no-untyped-call]
    pb_grpc.add_ObservationInternalServiceServicer_to_server(  # type: ignore[no-untyped-call]
        ObservationInternalServicer(service), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            public = pb_grpc.ObservationServiceStub(channel)  # type: ignore[no-untyped-call]
            internal = pb_grpc.ObservationInternalServiceStub(channel)  # type: ignore[no-untyped-call]
            yield public, internal, trail, alerts
    finally:
        await server.stop(grace=None)


def as_(caller: str) -> list[tuple[str, str]]:
    return [("x-test-caller", caller)]


MESH = [(INTERNAL_HEADER, INTERNAL_TOKEN), ("x-medmesh-caller", "mqtt_adapter")]


async def call_error(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)
    assert status is not None
    infos, bad_requests = unpack_details(status)
    assert len(infos) == 1
    assert infos[0].domain == "observation.medmesh"
    return caught.value.code(), infos[0].reason, [v.field for b in bad_requests for v in b.field_violations]


def reading(message_id: str, seconds: int, value: float, metric: str = "heart_rate") -> pb.Observation:
    return pb.Observation(
        message_id=message_id,
        metric=metric,
        time=stamp(AT + timedelta(seconds=seconds)),
        numeric_value=value,
        unit="/min",
        # Output-only: ignored, whatever the sender claims.
        patient="organizations/evil/patients/x",
        organization="organizations/evil",
    )


async def test_grpc_write_then_read(grpc_observations: Any) -> None:
    public, internal, trail, alerts = grpc_observations
    batch = [reading("m-1", 0, 60), reading("m-2", 30, 80), reading("m-3", 90, 100), pb.Observation(message_id="bad")]

    written = await internal.WriteObservations(
        pb.WriteObservationsRequest(device=DEVICE, observations=batch), metadata=MESH
    )
    again = await internal.WriteObservations(
        pb.WriteObservationsRequest(device=DEVICE, observations=batch), metadata=MESH
    )

    stored, duplicate, rejected = (
        pb.ObservationResult.OUTCOME_STORED,
        pb.ObservationResult.OUTCOME_DUPLICATE,
        pb.ObservationResult.OUTCOME_REJECTED,
    )
    assert [r.outcome for r in written.results] == [stored, stored, stored, rejected]
    assert [r.outcome for r in again.results] == [duplicate, duplicate, duplicate, rejected]
    assert written.results[0].observation == f"{DEVICE}/observations/{observation_id(DEVICE, 'm-1')}"
    assert (written.results[3].message_id, written.results[3].reason) == ("bad", "INVALID_FIELD")
    assert written.results[3].description.startswith("metric: ")
    assert trail.events == []  # device telemetry is not audited per batch
    assert len(alerts.samples) == 3

    listed = await public.ListObservations(
        pb.ListObservationsRequest(parent=PATIENT, page_size=2), metadata=as_("clinician")
    )
    assert [o.message_id for o in listed.observations] == ["m-1", "m-2"]
    assert (listed.observations[0].patient, listed.observations[0].organization) == (PATIENT, ORG_A)
    rest = await public.ListObservations(
        pb.ListObservationsRequest(parent=PATIENT, page_size=2, page_token=listed.next_page_token),
        metadata=as_("clinician"),
    )
    assert [o.message_id for o in rest.observations] == ["m-3"]
    assert rest.next_page_token == ""

    got = await public.GetObservation(
        pb.GetObservationRequest(name=listed.observations[1].name), metadata=as_("operator")
    )
    assert (got.numeric_value, got.time.ToDatetime(tzinfo=UTC)) == (80.0, AT + timedelta(seconds=30))

    aggregated = await public.AggregateObservations(
        pb.AggregateObservationsRequest(
            parent=DEVICE,
            metrics=["heart_rate"],
            start_time=stamp(AT),
            end_time=stamp(AT + timedelta(minutes=2)),
            bin_size=duration_pb2.Duration(seconds=60),
        ),
        metadata=as_("clinician"),
    )
    assert [
        (b.start_time.ToDatetime(tzinfo=UTC), b.count, b.min, b.max, b.mean, b.standard_deviation)
        for b in aggregated.bins
    ] == [
        (AT, 2, 60.0, 80.0, 70.0, 10.0),
        (AT + timedelta(minutes=1), 1, 100.0, 100.0, 100.0, 0.0),
    ]

    latest = await public.GetLatestObservations(
        pb.GetLatestObservationsRequest(parent=DEVICE), metadata=as_("operator")
    )
    assert [(o.metric, o.numeric_value) for o in latest.observations] == [("heart_rate", 100.0)]


async def test_grpc_batch_create_is_audited_once(grpc_observations: Any) -> None:
    public, _, trail, _ = grpc_observations
    request = pb.BatchCreateObservationsRequest(
        parent=DEVICE, observations=[reading("m-1", 0, 60), reading("m-2", 1, 61)]
    )

    response = await public.BatchCreateObservations(request, metadata=as_("operator"))

    assert [r.outcome for r in response.results] == [pb.ObservationResult.OUTCOME_STORED] * 2
    assert len(trail.events) == 1
    assert trail.events[0].method == "medmesh.observation.v1.ObservationService/BatchCreateObservations"


async def test_grpc_batch_write_answers_each_device_in_order(grpc_observations: Any) -> None:
    _, internal, _, _ = grpc_observations
    request = pb.BatchWriteObservationsRequest(
        requests=[
            pb.WriteObservationsRequest(device=DEVICE, observations=[reading("b-1", 0, 60)]),
            pb.WriteObservationsRequest(device=DEVICE, observations=[reading("b-1", 0, 60), reading("b-2", 1, 61)]),
        ]
    )

    reply = await internal.BatchWriteObservations(request, metadata=MESH)

    stored, duplicate = pb.ObservationResult.OUTCOME_STORED, pb.ObservationResult.OUTCOME_DUPLICATE
    assert [[r.outcome for r in response.results] for response in reply.responses] == [
        [stored],
        [duplicate, stored],
    ]
    code, _, _ = await call_error(internal.BatchWriteObservations(request, metadata=[(INTERNAL_HEADER, "wrong")]))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_grpc_internal_ingest_needs_the_mesh_credential(grpc_observations: Any) -> None:
    _, internal, _, _ = grpc_observations
    request = pb.WriteObservationsRequest(device=DEVICE, observations=[reading("m-1", 0, 60)])

    code, reason, _ = await call_error(internal.WriteObservations(request, metadata=[(INTERNAL_HEADER, "wrong")]))

    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INTERNAL_ONLY")


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (pb.BatchCreateObservationsRequest(parent=DEVICE), "observations"),
        (
            pb.BatchCreateObservationsRequest(
                parent=DEVICE, observations=[reading(f"m-{i}", i, 1) for i in range(501)]
            ),
            "observations",
        ),
        (pb.BatchCreateObservationsRequest(parent="devices/", observations=[reading("m", 0, 1)]), "parent"),
    ],
)
async def test_grpc_bad_batches_are_invalid_as_a_whole(
    grpc_observations: Any, request_message: pb.BatchCreateObservationsRequest, field: str
) -> None:
    public, _, trail, _ = grpc_observations

    code, _, fields = await call_error(public.BatchCreateObservations(request_message, metadata=as_("operator")))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == [field]
    assert trail.events == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"bin_size": duration_pb2.Duration(nanos=999_000_000)}, "bin_size"),
        ({"metrics": []}, "metrics"),
        ({"metrics": ["Heart Rate"]}, "metrics[0]"),
        ({"end_time": None}, "end_time"),
    ],
)
async def test_grpc_bad_aggregations_name_the_field(
    grpc_observations: Any, changes: dict[str, Any], field: str
) -> None:
    public, _, _, _ = grpc_observations
    values: dict[str, Any] = {
        "parent": DEVICE,
        "metrics": ["heart_rate"],
        "start_time": stamp(AT),
        "end_time": stamp(AT + timedelta(hours=1)),
        "bin_size": duration_pb2.Duration(seconds=60),
    }
    values.update(changes)
    values = {k: v for k, v in values.items() if v is not None}

    code, _, fields = await call_error(
        public.AggregateObservations(pb.AggregateObservationsRequest(**values), metadata=as_("clinician"))
    )

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == [field]


async def test_grpc_too_many_bins(grpc_observations: Any) -> None:
    public, _, _, _ = grpc_observations
    request = pb.AggregateObservationsRequest(
        parent=DEVICE,
        metrics=["heart_rate"],
        start_time=stamp(AT),
        end_time=stamp(AT + timedelta(days=1)),
        bin_size=duration_pb2.Duration(seconds=1),
    )

    code, reason, fields = await call_error(public.AggregateObservations(request, metadata=as_("clinician")))

    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_BINS", ["bin_size"])


async def test_grpc_permission_denied_before_not_found(grpc_observations: Any) -> None:
    public, _, _, _ = grpc_observations

    code, reason, _ = await call_error(
        public.ListObservations(
            pb.ListObservationsRequest(parent="organizations/a/patients/nobody"), metadata=as_("outsider")
        )
    )

    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ORGANIZATION_ACCESS_DENIED")
