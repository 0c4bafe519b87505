"""What the adapter asks of the mesh: small interfaces over the services' internal gRPC APIs.

The adapter keeps no state that matters; each of these services is the source of truth for
its part (as Eclipse Hono's protocol adapters talk to its device registry and command router).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2

from medmesh.command.v1 import command_service_pb2 as command_pb
from medmesh.command.v1 import command_service_pb2_grpc as command_grpc
from medmesh.device.v1 import device_credential_service_pb2 as credential_pb
from medmesh.device.v1 import device_credential_service_pb2_grpc as credential_grpc
from medmesh.device.v1 import device_internal_service_pb2 as device_pb
from medmesh.device.v1 import device_internal_service_pb2_grpc as device_grpc
from medmesh.file.v1 import file_service_pb2 as file_pb
from medmesh.file.v1 import file_service_pb2_grpc as file_grpc
from medmesh.observation.v1 import observation_service_pb2 as observation_pb
from medmesh.observation.v1 import observation_service_pb2_grpc as observation_grpc
from mqtt_adapter.payloads import CommandReport, ConfigReport, StatusReport

CALL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Admission:
    """Whether a connecting client may act for a device, and if not, why."""

    device: str  # `devices/{device}` when admitted
    refusal: str = ""

    @property
    def admitted(self) -> bool:
        return not self.refusal


class DeviceRegistry:
    """The device service: who a client is, and what the device reports about itself."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._credentials = credential_grpc.DeviceCredentialInternalServiceStub(channel)
        self._devices = device_grpc.DeviceInternalServiceStub(channel)

    async def check_certificate(self, der: bytes) -> Admission:
        reply = await self._credentials.CheckCertificate(
            credential_pb.CheckCertificateRequest(der=der), timeout=CALL_TIMEOUT
        )
        if not reply.valid:
            return Admission("", credential_pb.CheckCertificateResponse.Reason.Name(reply.reason))
        return Admission(reply.device)

    async def verify_credentials(self, username: str, password: str) -> Admission:
        reply = await self._credentials.VerifyTemporaryCredentials(
            credential_pb.VerifyTemporaryCredentialsRequest(username=username, password=password),
            timeout=CALL_TIMEOUT,
        )
        if not reply.valid:
            return Admission("", credential_pb.VerifyTemporaryCredentialsResponse.Reason.Name(reply.reason))
        return Admission(reply.device)

    async def report_connection(
        self,
        device: str,
        *,
        connected: bool,
        instance: str,
        address: str,
        session_id: str,
        remote_address: str,
        time: timestamp_pb2.Timestamp,
    ) -> None:
        request = device_pb.ReportConnectionRequest(
            device=device,
            connected=connected,
            adapter_instance=instance,
            adapter_address=address if connected else "",
            session_id=session_id,
            remote_address=remote_address,
            time=time,
        )
        await self._devices.ReportConnection(request, timeout=CALL_TIMEOUT)

    async def report_status(self, device: str, report: StatusReport) -> None:
        request = device_pb.ReportDeviceStatusRequest(device=device, state=report.state, message=report.message)  # type: ignore[arg-type]
        if report.battery_percent is not None:
            request.battery_percent = report.battery_percent
        if report.firmware_version is not None:
            request.firmware_version = report.firmware_version
        if report.time is not None:
            request.time.CopyFrom(report.time)
        await self._devices.ReportDeviceStatus(request, timeout=CALL_TIMEOUT)

    async def report_config(self, device: str, report: ConfigReport) -> device_pb.PendingConfig:
        request = device_pb.ReportConfigRequest(device=device, reported=report.config, reported_version=report.version)
        reply: device_pb.PendingConfig = await self._devices.ReportConfig(request, timeout=CALL_TIMEOUT)
        return reply

    async def pending_config(self, device: str) -> device_pb.PendingConfig:
        request = device_pb.GetPendingConfigRequest(device=device)
        reply: device_pb.PendingConfig = await self._devices.GetPendingConfig(request, timeout=CALL_TIMEOUT)
        return reply

    async def touch(self, device: str) -> None:
        await self._devices.TouchDevice(device_pb.TouchDeviceRequest(device=device), timeout=CALL_TIMEOUT)


class ObservationSink:
    """The observation service: durable, idempotent writes of several devices at once."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = observation_grpc.ObservationInternalServiceStub(channel)

    async def write(
        self, batches: Sequence[tuple[str, Sequence[observation_pb.Observation]]]
    ) -> list[list[observation_pb.ObservationResult]]:
        request = observation_pb.BatchWriteObservationsRequest(
            requests=[
                observation_pb.WriteObservationsRequest(device=device, observations=observations)
                for device, observations in batches
            ]
        )
        reply = await self._stub.BatchWriteObservations(request, timeout=CALL_TIMEOUT)
        return [list(response.results) for response in reply.responses]


class CommandQueue:
    """The command service: what a device should be told, and what it reported."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = command_grpc.CommandInternalServiceStub(channel)

    async def pending(self, device: str) -> command_pb.ListPendingCommandsResponse:
        reply: command_pb.ListPendingCommandsResponse = await self._stub.ListPendingCommands(
            command_pb.ListPendingCommandsRequest(device=device), timeout=CALL_TIMEOUT
        )
        return reply

    async def mark_delivered(self, name: str) -> None:
        await self._stub.MarkCommandDelivered(command_pb.MarkCommandDeliveredRequest(name=name), timeout=CALL_TIMEOUT)

    async def report(self, name: str, report: CommandReport) -> None:
        request = command_pb.ReportCommandStatusRequest(
            name=name,
            state=report.state,  # type: ignore[arg-type]
            error_message=report.error_message,
        )
        if report.result is not None:
            request.result.CopyFrom(report.result)
        await self._stub.ReportCommandStatus(request, timeout=CALL_TIMEOUT)


class FileDesk:
    """The file service: pre-signed upload URLs for a device's files."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = file_grpc.FileInternalServiceStub(channel)

    async def create(self, request: file_pb.CreateDeviceFileRequest) -> file_pb.CreateFileResponse:
        reply: file_pb.CreateFileResponse = await self._stub.CreateDeviceFile(request, timeout=CALL_TIMEOUT)
        return reply

    async def complete(self, request: file_pb.CompleteDeviceFileRequest) -> file_pb.File:
        reply: file_pb.File = await self._stub.CompleteDeviceFile(request, timeout=60.0)
        return reply


@dataclass(frozen=True)
class Mesh:
    registry: DeviceRegistry
    observations: ObservationSink
    commands: CommandQueue
    files: FileDesk
