"""The patient service as the device service sees it: does the patient a device is assigned to exist?

The device service stores only the opaque patient name; it never asks for, keeps or returns PHI.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from medmesh.patient.v1 import patient_service_pb2 as pb
from medmesh.patient.v1 import patient_service_pb2_grpc as pb_grpc
from medmesh.runtime.errors import Unavailable


class PatientDirectory(Protocol):
    async def exists(self, patient: str) -> bool:
        """True if the caller may see that the patient exists; False if it does not or they may not."""


class GrpcPatientDirectory:
    """Asks the patient service over gRPC with the caller's token (the mesh channel forwards it),
    so a caller can assign only patients they could look up themselves."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = 3.0) -> None:
        self._stub = pb_grpc.PatientServiceStub(channel)
        self._timeout = timeout

    async def exists(self, patient: str) -> bool:
        try:
            await self._stub.GetPatient(pb.GetPatientRequest(name=patient), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            # Not there, or not visible to this caller: alike, so a refusal reveals nothing.
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                return False
            raise Unavailable(
                f"cannot check patient {patient!r}: {error.code().name}",
                reason="PATIENT_SERVICE_UNAVAILABLE",
            ) from error
        return True
