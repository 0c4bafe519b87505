"""gRPC servicers: translate protobuf <-> domain, nothing else."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2

from medmesh.command.v1 import command_service_pb2 as pb
from medmesh.command.v1 import command_service_pb2_grpc as pb_grpc
from medmesh.runtime.protoconv import timestamp
from services.command.domain import Command, CommandRequest, CommandState, Session, SessionRequest, SessionState
from services.command.service import CommandService

_STATE_TO_PB = {
    CommandState.PENDING: pb.Command.STATE_PENDING,
    CommandState.DELIVERED: pb.Command.STATE_DELIVERED,
    CommandState.IN_PROGRESS: pb.Command.STATE_IN_PROGRESS,
    CommandState.COMPLETED: pb.Command.STATE_COMPLETED,
    CommandState.FAILED: pb.Command.STATE_FAILED,
    CommandState.TIMED_OUT: pb.Command.STATE_TIMED_OUT,
    CommandState.CANCELED: pb.Command.STATE_CANCELED,
    CommandState.EXPIRED: pb.Command.STATE_EXPIRED,
}
_STATE_FROM_PB = {value: key for key, value in _STATE_TO_PB.items()}
# WaitCommand ends this long before the caller's deadline, so the answer still reaches it.
_ANSWER_MARGIN_SECONDS = 0.2
_SESSION_STATE_TO_PB = {
    SessionState.STARTING: pb.Session.STATE_STARTING,
    SessionState.ACTIVE: pb.Session.STATE_ACTIVE,
    SessionState.PAUSING: pb.Session.STATE_PAUSING,
    SessionState.PAUSED: pb.Session.STATE_PAUSED,
    SessionState.RESUMING: pb.Session.STATE_RESUMING,
    SessionState.STOPPING: pb.Session.STATE_STOPPING,
    SessionState.STOPPED: pb.Session.STATE_STOPPED,
    SessionState.FAILED: pb.Session.STATE_FAILED,
}
INTERNAL_SERVICE = "medmesh.command.v1.CommandInternalService"
# Called by the MQTT adapter with the mesh credential, never by users: `service_authenticator`'s internal methods.
INTERNAL_METHODS = frozenset(
    f"/{INTERNAL_SERVICE}/{method}" for method in ("ListPendingCommands", "MarkCommandDelivered", "ReportCommandStatus")
)
# Integers as JSON numbers stay integers for the device, not 5.0 (Struct numbers are doubles).
_EXACT_INTEGER = 2**53


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_INTEGER:
        return int(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    plain = _plain(json_format.MessageToDict(struct))
    return plain if isinstance(plain, dict) else {}


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _duration(value: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


def _optional_duration(message: Any, field: str) -> timedelta | None:
    return getattr(message, field).ToTimedelta() if message.HasField(field) else None


def _set_time(message: Any, field: str, moment: datetime | None) -> None:
    if moment is not None:
        getattr(message, field).CopyFrom(timestamp(moment))


def command_to_pb(command: Command) -> pb.Command:
    message = pb.Command(
        name=command.name,
        command_name=command.command_name,
        parameters=dict_to_struct(command.parameters),
        timeout=_duration(command.timeout),
        ttl=_duration(command.ttl),
        state=_STATE_TO_PB[command.state],
        error_message=command.error_message,
        stop_requested=command.stop_requested,
        create_time=timestamp(command.create_time),
        expire_time=timestamp(command.expire_time),
        creator=command.creator,
        organization=command.organization,
        session=command.session,
        update_time=timestamp(command.update_time),
        etag=command.etag,
    )
    if command.result is not None:
        message.result.CopyFrom(dict_to_struct(command.result))
    for field in ("deliver_time", "start_time", "complete_time", "deadline", "stop_request_time"):
        _set_time(message, field, getattr(command, field))
    return message


def command_request_from_pb(command: pb.Command) -> CommandRequest:
    return CommandRequest(
        command_name=command.command_name,
        parameters=struct_to_dict(command.parameters),
        timeout=_optional_duration(command, "timeout"),
        ttl=_optional_duration(command, "ttl"),
    )


def session_to_pb(session: Session) -> pb.Session:
    message = pb.Session(
        name=session.name,
        state=_SESSION_STATE_TO_PB[session.state],
        parameters=dict_to_struct(session.parameters),
        command_timeout=_duration(session.command_timeout),
        command_ttl=_duration(session.command_ttl),
        current_command=session.current_command,
        error_message=session.error_message,
        patient=session.patient,
        organization=session.organization,
        creator=session.creator,
        create_time=timestamp(session.create_time),
        update_time=timestamp(session.update_time),
        etag=session.etag,
    )
    _set_time(message, "active_time", session.active_time)
    _set_time(message, "end_time", session.end_time)
    return message


def session_request_from_pb(session: pb.Session) -> SessionRequest:
    return SessionRequest(
        parameters=struct_to_dict(session.parameters),
        command_timeout=_optional_duration(session, "command_timeout"),
        command_ttl=_optional_duration(session, "command_ttl"),
    )


class CommandServicer(pb_grpc.CommandServiceServicer):
    def __init__(self, service: CommandService) -> None:
        self._service = service

    async def CreateCommand(self, request: pb.CreateCommandRequest, context: grpc.aio.ServicerContext) -> pb.Command:
        command = await self._service.create_command(
            request.parent, command_request_from_pb(request.command), request.command_id
        )
        return command_to_pb(command)

    async def GetCommand(self, request: pb.GetCommandRequest, context: grpc.aio.ServicerContext) -> pb.Command:
        return command_to_pb(await self._service.get_command(request.name))

    async def WaitCommand(self, request: pb.WaitCommandRequest, context: grpc.aio.ServicerContext) -> pb.Command:
        state = _STATE_FROM_PB.get(request.state) if request.state else None
        timeout = request.timeout.ToTimedelta() if request.HasField("timeout") else None
        # The caller's own deadline ends the wait first, with time left to send the answer.
        remaining = context.time_remaining()
        if remaining is not None:
            cap = timedelta(seconds=max(0.0, remaining - _ANSWER_MARGIN_SECONDS))
            timeout = cap if timeout is None else min(timeout, cap)
        return command_to_pb(await self._service.wait_command(request.name, state, timeout))

    async def ListCommands(
        self, request: pb.ListCommandsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCommandsResponse:
        page = await self._service.list_commands(request.parent, request.filter, request.page_size, request.page_token)
        return pb.ListCommandsResponse(
            commands=[command_to_pb(c) for c in page.commands], next_page_token=page.next_page_token
        )

    async def CancelCommand(self, request: pb.CancelCommandRequest, context: grpc.aio.ServicerContext) -> pb.Command:
        return command_to_pb(await self._service.cancel_command(request.name))

    async def StopCommand(self, request: pb.StopCommandRequest, context: grpc.aio.ServicerContext) -> pb.Command:
        return command_to_pb(await self._service.stop_command(request.name))

    async def StartSession(self, request: pb.StartSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        session = await self._service.start_session(
            request.parent, session_request_from_pb(request.session), request.session_id
        )
        return session_to_pb(session)

    async def GetSession(self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        return session_to_pb(await self._service.get_session(request.name))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        page = await self._service.list_sessions(request.parent, request.filter, request.page_size, request.page_token)
        return pb.ListSessionsResponse(
            sessions=[session_to_pb(s) for s in page.sessions], next_page_token=page.next_page_token
        )

    async def PauseSession(self, request: pb.PauseSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        return session_to_pb(await self._service.pause_session(request.name))

    async def ResumeSession(self, request: pb.ResumeSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        return session_to_pb(await self._service.resume_session(request.name))

    async def StopSession(self, request: pb.StopSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        return session_to_pb(await self._service.stop_session(request.name))


class CommandInternalServicer(pb_grpc.CommandInternalServiceServicer):
    def __init__(self, service: CommandService) -> None:
        self._service = service

    async def ListPendingCommands(
        self, request: pb.ListPendingCommandsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPendingCommandsResponse:
        pending = await self._service.list_pending(request.device, request.page_size)
        return pb.ListPendingCommandsResponse(
            commands=[command_to_pb(c) for c in pending.commands],
            stop_requests=[command_to_pb(c) for c in pending.stop_requests],
            cancellations=[command_to_pb(c) for c in pending.cancellations],
        )

    async def MarkCommandDelivered(
        self, request: pb.MarkCommandDeliveredRequest, context: grpc.aio.ServicerContext
    ) -> pb.Command:
        return command_to_pb(await self._service.mark_delivered(request.name))

    async def ReportCommandStatus(
        self, request: pb.ReportCommandStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.Command:
        result = struct_to_dict(request.result) if request.HasField("result") else None
        # protovalidate admits only IN_PROGRESS, COMPLETED and FAILED; the service checks again.
        state = _STATE_FROM_PB.get(request.state, CommandState.PENDING)
        command = await self._service.report_status(request.name, state, result, request.error_message)
        return command_to_pb(command)
