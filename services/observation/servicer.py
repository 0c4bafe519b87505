"""gRPC servicers: translate protobuf <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from medmesh.observation.v1 import observation_service_pb2 as pb
from medmesh.observation.v1 import observation_service_pb2_grpc as pb_grpc
from medmesh.runtime.protoconv import timestamp
from services.observation.domain import (
    BatchResult,
    Observation,
    ObservationBin,
    ObservationDraft,
    Outcome,
    Waveform,
)
from services.observation.service import ObservationService

# Internal-only: the authenticator admits it with the mesh credential, never with a user token.
INTERNAL_METHODS = frozenset(
    {
        "/medmesh.observation.v1.ObservationInternalService/WriteObservations",
        "/medmesh.observation.v1.ObservationInternalService/BatchWriteObservations",
    }
)

_OUTCOME_TO_PB = {
    Outcome.STORED: pb.ObservationResult.OUTCOME_STORED,
    Outcome.DUPLICATE: pb.ObservationResult.OUTCOME_DUPLICATE,
    Outcome.REJECTED: pb.ObservationResult.OUTCOME_REJECTED,
}


def _time(message: Timestamp, present: bool) -> datetime | None:
    """None when unset or outside what a datetime holds; the domain rejects the item then."""
    if not present:
        return None
    try:
        return message.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


def _duration(message: Duration, present: bool) -> timedelta | None:
    if not present:
        return None
    try:
        return message.ToTimedelta()
    except (ValueError, OverflowError):
        return None


def draft_from_pb(message: pb.Observation) -> ObservationDraft:
    kind = message.WhichOneof("value")
    waveform = None
    if kind == "waveform":
        source = message.waveform
        waveform = Waveform(
            source.sample_rate_hz,
            tuple(source.samples),
            _time(source.start_time, source.HasField("start_time")),
        )
    return ObservationDraft(
        message_id=message.message_id,
        metric=message.metric,
        time=_time(message.time, message.HasField("time")),
        unit=message.unit,
        session=message.session,
        numeric_value=message.numeric_value if kind == "numeric_value" else None,
        boolean_value=message.boolean_value if kind == "boolean_value" else None,
        string_value=message.string_value if kind == "string_value" else None,
        waveform=waveform,
    )


def drafts_from_pb(messages: Sequence[pb.Observation]) -> list[ObservationDraft]:
    return [draft_from_pb(m) for m in messages]


def to_pb(observation: Observation) -> pb.Observation:
    message = pb.Observation(
        name=observation.name,
        message_id=observation.message_id,
        metric=observation.metric,
        time=timestamp(observation.time),
        unit=observation.unit,
        session=observation.session,
        patient=observation.patient,
        organization=observation.organization,
        receive_time=timestamp(observation.receive_time),
    )
    if observation.numeric_value is not None:
        message.numeric_value = observation.numeric_value
    elif observation.boolean_value is not None:
        message.boolean_value = observation.boolean_value
    elif observation.string_value is not None:
        message.string_value = observation.string_value
    elif observation.waveform is not None:
        waveform = observation.waveform
        message.waveform.sample_rate_hz = waveform.sample_rate_hz
        message.waveform.samples.extend(waveform.samples)
        if waveform.start_time is not None:
            message.waveform.start_time.CopyFrom(timestamp(waveform.start_time))
    return message


def results_to_pb(result: BatchResult) -> list[pb.ObservationResult]:
    return [
        pb.ObservationResult(
            outcome=_OUTCOME_TO_PB[r.outcome],
            message_id=r.message_id,
            observation=r.observation,
            reason=r.reason,
            description=r.description,
        )
        for r in result.results
    ]


def bin_to_pb(cell: ObservationBin) -> pb.ObservationBin:
    return pb.ObservationBin(
        start_time=timestamp(cell.start_time),
        metric=cell.metric,
        count=cell.count,
        min=cell.min,
        max=cell.max,
        mean=cell.mean,
        standard_deviation=cell.standard_deviation,
    )


class ObservationServicer(pb_grpc.ObservationServiceServicer):
    def __init__(self, service: ObservationService) -> None:
        self._service = service

    async def GetObservation(
        self, request: pb.GetObservationRequest, context: grpc.aio.ServicerContext
    ) -> pb.Observation:
        return to_pb(await self._service.get(request.name))

    async def ListObservations(
        self, request: pb.ListObservationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListObservationsResponse:
        page = await self._service.list_observations(
            request.parent, request.filter, request.page_size, request.page_token
        )
        return pb.ListObservationsResponse(
            observations=[to_pb(o) for o in page.observations], next_page_token=page.next_page_token
        )

    async def BatchCreateObservations(
        self, request: pb.BatchCreateObservationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchCreateObservationsResponse:
        result = await self._service.batch_create(request.parent, drafts_from_pb(request.observations))
        return pb.BatchCreateObservationsResponse(results=results_to_pb(result))

    async def AggregateObservations(
        self, request: pb.AggregateObservationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AggregateObservationsResponse:
        bins = await self._service.aggregate(
            request.parent,
            list(request.metrics),
            _time(request.start_time, request.HasField("start_time")),
            _time(request.end_time, request.HasField("end_time")),
            _duration(request.bin_size, request.HasField("bin_size")),
        )
        return pb.AggregateObservationsResponse(bins=[bin_to_pb(b) for b in bins])

    async def GetLatestObservations(
        self, request: pb.GetLatestObservationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLatestObservationsResponse:
        latest = await self._service.latest(request.parent)
        return pb.GetLatestObservationsResponse(observations=[to_pb(o) for o in latest])


class ObservationInternalServicer(pb_grpc.ObservationInternalServiceServicer):
    def __init__(self, service: ObservationService) -> None:
        self._service = service

    async def WriteObservations(
        self, request: pb.WriteObservationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.WriteObservationsResponse:
        result = await self._service.write(request.device, drafts_from_pb(request.observations))
        return pb.WriteObservationsResponse(results=results_to_pb(result))

    async def BatchWriteObservations(
        self, request: pb.BatchWriteObservationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchWriteObservationsResponse:
        batches = [(item.device, drafts_from_pb(item.observations)) for item in request.requests]
        results = await self._service.write_many(batches)
        return pb.BatchWriteObservationsResponse(
            responses=[pb.WriteObservationsResponse(results=results_to_pb(result)) for result in results]
        )
