"""The patient service as the identity service sees it: does a patient record exist?"""

from __future__ import annotations

import grpc

from medmesh.patient.v1 import patient_service_pb2 as pb
from medmesh.patient.v1 import patient_service_pb2_grpc as pb_grpc
from medmesh.runtime.errors import Unavailable

# The caller cannot see the record: for linking a user to it, that is the same as absent.
_ABSENT = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED}


class GrpcPatientDirectory:
    """Asks the patient service over gRPC, with the caller's own token (CallerCredentials), so
    only a patient the caller may see can be linked. Identity stores only the resource name."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = 3.0) -> None:
        self._stub = pb_grpc.PatientServiceStub(channel)
        self._timeout = timeout

    async def exists(self, patient: str) -> bool:
        try:
            await self._stub.GetPatient(pb.GetPatientRequest(name=patient), timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() in _ABSENT:
                return False
            raise Unavailable(
                f"cannot check patient {patient!r}: {error.code().name}",
                reason="PATIENT_SERVICE_UNAVAILABLE",
            ) from error
        return True
