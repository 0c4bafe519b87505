"""The command servicers: protobuf <-> domain, and the whole call path through the shared interceptor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from grpc_status import rpc_status

from medmesh.command.v1 import command_service_pb2 as pb
from medmesh.command.v1 import command_service_pb2_grpc as pb_grpc
from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import INTERNAL_HEADER, Authenticator, Principal, Role, TokenVerifier
from medmesh.runtime.directories import DeviceAssignment
from medmesh.runtime.interceptors import RequestInterceptor
from services.command.domain import CommandRequest, CommandState, SessionState, new_command
from services.command.service import CommandService
from services.command.servicer import (
    INTERNAL_METHODS,
    CommandInternalServicer,
    CommandServicer,
    command_request_from_pb,
    command_to_pb,
    dict_to_struct,
    session_request_from_pb,
    struct_to_dict,
)
from tests.rich_status import unpack_details
from tests.unit.test_command_fakes import FakeDeviceDirectory, InMemoryCommandStore, InMemorySessionStore

ORG_A = "organizations/a"
AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
INTERNAL_TOKEN = "mesh-credential"


# --- conversions ----------------------------------------------------------------------------------


def test_command_to_pb() -> None:
    command = new_command("SN-1", ORG_A, CommandRequest("reboot", {"delay": 5, "mode": "soft"}), "u", AT)
    done = command.delivered(AT).finished(CommandState.COMPLETED, AT + timedelta(seconds=2), {"ok": True}, "")

    message = command_to_pb(done)

    assert message.name == done.name
    assert message.state == pb.Command.STATE_COMPLETED
    assert struct_to_dict(message.parameters) == {"delay": 5, "mode": "soft"}
    assert struct_to_dict(message.result) == {"ok": True}
    assert message.timeout.ToTimedelta() == timedelta(seconds=60)
    assert message.ttl.ToTimedelta() == timedelta(hours=1)
    assert message.deliver_time.ToDatetime(tzinfo=UTC) == AT
    assert message.deadline.ToDatetime(tzinfo=UTC) == AT + timedelta(seconds=60)
    assert message.complete_time.ToDatetime(tzinfo=UTC) == AT + timedelta(seconds=2)
    assert message.expire_time.ToDatetime(tzinfo=UTC) == AT + timedelta(hours=1)
    assert not message.HasField("start_time")  # never reported IN_PROGRESS
    assert not message.HasField("stop_request_time")
    assert (message.organization, message.creator, message.etag) == (ORG_A, "u", done.etag)


def test_a_pending_command_has_no_result_and_no_deadline() -> None:
    message = command_to_pb(new_command("SN-1", ORG_A, CommandRequest("reboot"), "u", AT))

    assert message.state == pb.Command.STATE_PENDING
    assert not message.HasField("result")
    assert not message.HasField("deadline")


def test_integers_stay_integers() -> None:
    """Struct numbers are doubles; the device should still get 5, not 5.0."""
    value = {"n": 5, "x": 2.5, "nested": {"list": [1, 2.0, "a", None, True]}}

    assert struct_to_dict(dict_to_struct(value)) == value
    assert isinstance(struct_to_dict(dict_to_struct(value))["n"], int)


def test_requests_from_pb() -> None:
    unset = command_request_from_pb(pb.Command(command_name="reboot"))
    timed = command_request_from_pb(
        pb.Command(
            command_name="reboot", timeout=duration_pb2.Duration(seconds=5), ttl=duration_pb2.Duration(seconds=9)
        )
    )
    session = session_request_from_pb(pb.Session(command_timeout=duration_pb2.Duration(seconds=7)))

    assert (unset.timeout, unset.ttl, unset.parameters) == (None, None, {})
    assert (timed.timeout, timed.ttl) == (timedelta(seconds=5), timedelta(seconds=9))
    assert (session.command_timeout, session.command_ttl) == (timedelta(seconds=7), None)


# --- over gRPC, through the shared interceptor ----------------------------------------------------


class HeaderAuthenticator(Authenticator):
    """Internal methods take the real mesh credential; for the others the test names the caller."""

    principals: ClassVar[dict[str, Principal]] = {
        "operator": Principal("organizations/a/users/o", ORG_A, Role.OPERATOR),
        "outsider": Principal("organizations/b/users/c", "organizations/b", Role.CLINICIAN),
    }

    def __init__(self) -> None:
        super().__init__(
            TokenVerifier(keys=None),  # type: ignore[arg-type]
            internal_methods=INTERNAL_METHODS,
            internal_token=INTERNAL_TOKEN,
        )

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal | None:
        if method in INTERNAL_METHODS or "x-test-caller" not in metadata:
            return await super().authenticate(method, metadata)
        return self.principals[metadata["x-test-caller"]]


@dataclass
class Stubs:
    public: Any
    internal: Any
    trail: RecordingAuditTrail


@pytest.fixture
async def stubs() -> AsyncIterator[Stubs]:
    trail = RecordingAuditTrail("command")
    devices = FakeDeviceDirectory([DeviceAssignment("devices/SN-1", "organizations/m", ORG_A)])
    service = CommandService(InMemoryCommandStore(), InMemorySessionStore(), devices, trail)
    server = grpc.aio.server(interceptors=[RequestInterceptor("command.medmesh", HeaderAuthenticator())])
    pb_grpc.add_CommandServiceServicer_to_server(CommandServicer(service), server)  # type: ignore[no-untyped-call]
    pb_grpc.add_CommandInternalServiceServicer_to_server(  # type: ignore[no-untyped-call]
        CommandInternalServicer(service), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Stubs(
                pb_grpc.CommandServiceStub(channel),  # type: ignore[no-untyped-call]
                pb_grpc.CommandInternalServiceStub(channel),  # type: ignore[no-untyped-call]
                trail,
            )
    finally:
        await server.stop(grace=None)


def as_(caller: str) -> list[tuple[str, str]]:
    return [("x-test-caller", caller)]


ADAPTER = [(INTERNAL_HEADER, INTERNAL_TOKEN), ("x-medmesh-caller", "mqtt_adapter")]


async def call_error(call: Any) -> tuple[grpc.StatusCode, str, list[str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = rpc_status.from_call(caught.value)
    assert status is not None
    infos, bad_requests = unpack_details(status)
    assert len(infos) == 1
    assert infos[0].domain == "command.medmesh"
    fields = [v.field for b in bad_requests for v in b.field_violations]
    return caught.value.code(), infos[0].reason, fields


async def test_grpc_command_lifecycle(stubs: Stubs) -> None:
    parameters = struct_pb2.Struct()
    parameters.update({"delay": 5})
    body = pb.Command(command_name="reboot", parameters=parameters, timeout=duration_pb2.Duration(seconds=30))

    created = await stubs.public.CreateCommand(
        pb.CreateCommandRequest(parent="devices/SN-1", command=body), metadata=as_("operator")
    )
    assert created.state == pb.Command.STATE_PENDING
    assert created.organization == ORG_A

    pending = await stubs.internal.ListPendingCommands(
        pb.ListPendingCommandsRequest(device="devices/SN-1"), metadata=ADAPTER
    )
    assert [c.name for c in pending.commands] == [created.name]
    assert struct_to_dict(pending.commands[0].parameters) == {"delay": 5}

    delivered = await stubs.internal.MarkCommandDelivered(
        pb.MarkCommandDeliveredRequest(name=created.name), metadata=ADAPTER
    )
    assert delivered.state == pb.Command.STATE_DELIVERED
    assert delivered.deadline.ToDatetime() - delivered.deliver_time.ToDatetime() == timedelta(seconds=30)

    result = struct_pb2.Struct()
    result.update({"uptime": 1})
    report = pb.ReportCommandStatusRequest(name=created.name, state=pb.Command.STATE_COMPLETED, result=result)
    done = await stubs.internal.ReportCommandStatus(report, metadata=ADAPTER)
    assert done.state == pb.Command.STATE_COMPLETED
    assert struct_to_dict(done.result) == {"uptime": 1}

    got = await stubs.public.GetCommand(pb.GetCommandRequest(name=created.name), metadata=as_("operator"))
    assert got == done
    listed = await stubs.public.ListCommands(
        pb.ListCommandsRequest(parent="devices/SN-1", filter="state = COMPLETED"), metadata=as_("operator")
    )
    assert [c.name for c in listed.commands] == [created.name]

    code, reason, _ = await call_error(
        stubs.public.CancelCommand(pb.CancelCommandRequest(name=created.name), metadata=as_("operator"))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COMMAND_ALREADY_FINISHED")
    assert [e.method.rsplit("/", 1)[1] for e in stubs.trail.events] == [
        "CreateCommand",
        "MarkCommandDelivered",
        "ReportCommandStatus",
    ]


async def test_grpc_session(stubs: Stubs) -> None:
    session = await stubs.public.StartSession(
        pb.StartSessionRequest(parent="devices/SN-1", session=pb.Session(), session_id="visit-1"),
        metadata=as_("operator"),
    )
    assert (session.name, session.state) == ("devices/SN-1/sessions/visit-1", pb.Session.STATE_STARTING)

    await stubs.internal.ReportCommandStatus(
        pb.ReportCommandStatusRequest(name=session.current_command, state=pb.Command.STATE_COMPLETED), metadata=ADAPTER
    )
    active = await stubs.public.GetSession(pb.GetSessionRequest(name=session.name), metadata=as_("operator"))
    assert active.state == pb.Session.STATE_ACTIVE
    assert active.HasField("active_time")

    pausing = await stubs.public.PauseSession(pb.PauseSessionRequest(name=session.name), metadata=as_("operator"))
    assert pausing.state == pb.Session.STATE_PAUSING
    stopping = await stubs.public.StopSession(pb.StopSessionRequest(name=session.name), metadata=as_("operator"))
    assert stopping.state == pb.Session.STATE_STOPPING
    code, reason, _ = await call_error(
        stubs.public.ResumeSession(pb.ResumeSessionRequest(name=session.name), metadata=as_("operator"))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, f"SESSION_{SessionState.STOPPING.value}")
    listed = await stubs.public.ListSessions(
        pb.ListSessionsRequest(parent="devices/SN-1", filter="state = STOPPING"), metadata=as_("operator")
    )
    assert [s.name for s in listed.sessions] == [session.name]


async def test_grpc_internal_methods_need_the_mesh_credential(stubs: Stubs) -> None:
    request = pb.ListPendingCommandsRequest(device="devices/SN-1")

    code, reason, _ = await call_error(stubs.internal.ListPendingCommands(request))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INTERNAL_ONLY")
    wrong = [(INTERNAL_HEADER, "guess")]
    code, reason, _ = await call_error(stubs.internal.ListPendingCommands(request, metadata=wrong))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "INTERNAL_ONLY")


async def test_grpc_a_timed_out_command_refuses_the_devices_report(stubs: Stubs) -> None:
    created = await stubs.public.CreateCommand(
        pb.CreateCommandRequest(
            parent="devices/SN-1", command=pb.Command(command_name="reboot", timeout=duration_pb2.Duration(seconds=1))
        ),
        metadata=as_("operator"),
    )
    await stubs.internal.MarkCommandDelivered(pb.MarkCommandDeliveredRequest(name=created.name), metadata=ADAPTER)
    await asyncio.sleep(1.1)

    code, reason, _ = await call_error(
        stubs.internal.ReportCommandStatus(
            pb.ReportCommandStatusRequest(name=created.name, state=pb.Command.STATE_COMPLETED), metadata=ADAPTER
        )
    )

    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COMMAND_TIMED_OUT")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            pb.CreateCommandRequest(parent="devices/SN-1", command=pb.Command(command_name="Reboot")),
            "command.command_name",
        ),
        (
            pb.CreateCommandRequest(
                parent="devices/SN-1",
                command=pb.Command(command_name="reboot", timeout=duration_pb2.Duration(nanos=500_000_000)),
            ),
            "command.timeout",
        ),
        (
            pb.CreateCommandRequest(
                parent="devices/SN-1",
                command=pb.Command(command_name="reboot", ttl=duration_pb2.Duration(seconds=8 * 86400)),
            ),
            "command.ttl",
        ),
        (pb.CreateCommandRequest(parent="devices/", command=pb.Command(command_name="reboot")), "parent"),
        (
            pb.CreateCommandRequest(parent="devices/SN-1", command=pb.Command(command_name="x"), command_id="A"),
            "command_id",
        ),
    ],
)
async def test_grpc_invalid_requests_name_the_field(
    stubs: Stubs, request_: pb.CreateCommandRequest, field: str
) -> None:
    code, _, fields = await call_error(stubs.public.CreateCommand(request_, metadata=as_("operator")))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == [field]
    assert stubs.trail.events == []


@pytest.mark.parametrize("state", [pb.Command.STATE_PENDING, pb.Command.STATE_CANCELED, pb.Command.STATE_UNSPECIFIED])
async def test_grpc_a_device_reports_only_progress_and_outcomes(stubs: Stubs, state: int) -> None:
    request = pb.ReportCommandStatusRequest(name="devices/SN-1/commands/c1", state=state)  # type: ignore[arg-type]

    code, _, fields = await call_error(stubs.internal.ReportCommandStatus(request, metadata=ADAPTER))

    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["state"])


async def test_grpc_permission_denied_before_not_found(stubs: Stubs) -> None:
    code, reason, _ = await call_error(
        stubs.public.GetCommand(pb.GetCommandRequest(name="devices/SN-1/commands/none"), metadata=as_("outsider"))
    )

    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ORGANIZATION_ACCESS_DENIED")


async def test_grpc_wait_command(stubs: Stubs) -> None:
    created = await stubs.public.CreateCommand(
        pb.CreateCommandRequest(parent="devices/SN-1", command=pb.Command(command_name="reboot")),
        metadata=as_("operator"),
    )
    # Left PENDING: answered when the adapter delivers it.
    waiter = asyncio.ensure_future(
        stubs.public.WaitCommand(
            pb.WaitCommandRequest(name=created.name, state=pb.Command.STATE_PENDING), metadata=as_("operator")
        )
    )
    await asyncio.sleep(0.05)
    delivered = await stubs.internal.MarkCommandDelivered(
        pb.MarkCommandDeliveredRequest(name=created.name), metadata=ADAPTER
    )
    assert await waiter == delivered

    # Not final within `timeout`, or within the caller's shorter deadline: the command as it is.
    request = pb.WaitCommandRequest(name=created.name, timeout=duration_pb2.Duration(nanos=100_000_000))
    assert await stubs.public.WaitCommand(request, metadata=as_("operator")) == delivered
    started = time.monotonic()
    answer = await stubs.public.WaitCommand(
        pb.WaitCommandRequest(name=created.name), metadata=as_("operator"), timeout=0.5
    )
    assert answer == delivered
    assert time.monotonic() - started < 0.5

    too_long = pb.WaitCommandRequest(name=created.name, timeout=duration_pb2.Duration(seconds=21))
    code, reason, fields = await call_error(stubs.public.WaitCommand(too_long, metadata=as_("operator")))
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", ["timeout"])
    code, reason, _ = await call_error(
        stubs.public.WaitCommand(pb.WaitCommandRequest(name=created.name), metadata=as_("outsider"))
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ORGANIZATION_ACCESS_DENIED")
