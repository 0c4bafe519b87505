"""The alert service as the observation service sees it: evaluate threshold rules on fresh values.

Best effort by design: ingest answers the device whether or not the alert service is up, so a
sample stored during an alert-service outage is never evaluated (at-most-once). The alternative,
an outbox like the audit trail's, would make evaluation at-least-once at the price of one more
write per batch, and would raise stale alerts in a burst when the alert service comes back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import grpc

from medmesh.alert.v1 import alert_service_pb2 as pb
from medmesh.alert.v1 import alert_service_pb2_grpc as pb_grpc
from medmesh.runtime.errors import Unavailable
from medmesh.runtime.protoconv import timestamp

log = logging.getLogger(__name__)

# While the alert service is failing, calls are skipped for this long after each failure, so an
# outage costs ingest one failed call per interval instead of one per batch (measured: an
# unreachable peer fails in ~0.8 s, the channel's UNAVAILABLE retries included).
RETRY_AFTER_SECONDS = 5.0


@dataclass(frozen=True)
class ObservationSample:
    device: str
    organization: str
    patient: str
    metric: str
    value: float
    time: datetime


class AlertEvaluator(Protocol):
    async def evaluate(self, samples: Sequence[ObservationSample]) -> None: ...


class GrpcAlertEvaluator:
    """`medmesh.alert.v1.AlertInternalService/EvaluateObservations`, with the mesh credential."""

    # Long enough for a busy alert service (a timeout reads as an outage and pauses evaluation),
    # short enough that a hung one delays one ingest answer per pause by at most this much.
    def __init__(self, channel: grpc.aio.Channel, timeout: float = 2.0) -> None:
        self._stub = pb_grpc.AlertInternalServiceStub(channel)
        self._timeout = timeout

    async def evaluate(self, samples: Sequence[ObservationSample]) -> None:
        request = pb.EvaluateObservationsRequest(
            samples=[
                pb.ObservationSample(
                    device=s.device,
                    organization=s.organization,
                    patient=s.patient,
                    metric=s.metric,
                    value=s.value,
                    time=timestamp(s.time),
                )
                for s in samples
            ]
        )
        try:
            await self._stub.EvaluateObservations(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise Unavailable(
                f"alert evaluation failed: {error.code().name}", reason="ALERT_SERVICE_UNAVAILABLE"
            ) from error


class BestEffortAlertEvaluator:
    """Never raises: a failure is logged once per outage, and calls pause `retry_after` seconds after each."""

    def __init__(
        self,
        evaluator: AlertEvaluator,
        retry_after: float = RETRY_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._evaluator = evaluator
        self._retry_after = retry_after
        self._clock = clock
        self._paused_until = float("-inf")
        self._failing = False
        self.skipped_samples = 0  # samples never evaluated since start, for operators and tests

    @property
    def failing(self) -> bool:
        return self._failing

    async def evaluate(self, samples: Sequence[ObservationSample]) -> None:
        if not samples:
            return
        if self._clock() < self._paused_until:
            self.skipped_samples += len(samples)
            return
        try:
            await self._evaluator.evaluate(samples)
        except Exception as error:  # whatever the port raises, ingest must not fail because of it
            self.skipped_samples += len(samples)
            self._paused_until = self._clock() + self._retry_after
            if not self._failing:
                self._failing = True
                log.warning("alert evaluation unavailable, stored observations go unevaluated: %s", error)
            return
        if self._failing:
            self._failing = False
            log.info("alert evaluation available again; %d samples were not evaluated", self.skipped_samples)
