"""CommandService against in-memory fakes: access, lifecycle, the adapter's calls, deadlines, races, sessions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from medmesh.runtime.audit import AuditEvent, RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, acting_as, internal_principal
from medmesh.runtime.directories import DeviceAssignment
from medmesh.runtime.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.command import service as service_module
from services.command.domain import (
    START_COMMAND,
    Command,
    CommandRequest,
    CommandState,
    Session,
    SessionRequest,
    SessionState,
    parse_command_name,
)
from services.command.service import CommandService
from services.command.watch import CommandWatch
from tests.unit.test_command_fakes import (
    Clock,
    FakeDeviceDirectory,
    InMemoryCommandStore,
    InMemorySessionStore,
    RecordingNotifier,
)

T = TypeVar("T")
S = CommandState
AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MANUFACTURER = "organizations/manufacturer"
ORG_A = "organizations/a"
ORG_B = "organizations/b"
SN1 = "devices/SN-1"  # the manufacturer's, in care at organization a, used by patient p1
SN2 = "devices/SN-2"  # organization b's own, not assigned
PATIENT_P1 = f"{ORG_A}/patients/p1"


def user(role: Role, organization: str = ORG_A) -> Principal:
    return Principal(subject=f"{organization}/users/{role.value}", organization=organization, role=role)


PLATFORM_ADMIN = user(Role.PLATFORM_ADMIN, MANUFACTURER)
ADMIN_A = user(Role.ORGANIZATION_ADMIN)
OPERATOR_A = user(Role.OPERATOR)
CLINICIAN_A = user(Role.CLINICIAN)
PATIENT_A = Principal(f"{ORG_A}/users/p", ORG_A, Role.PATIENT, patient=PATIENT_P1)
CLINICIAN_B = user(Role.CLINICIAN, ORG_B)
OPERATOR_MANUFACTURER = user(Role.OPERATOR, MANUFACTURER)
ADAPTER = internal_principal("mqtt_adapter")


class World:
    """One database (the stores) and any number of service instances over it."""

    def __init__(self) -> None:
        self.clock = Clock(AT)
        self.commands = InMemoryCommandStore()
        self.sessions = InMemorySessionStore()
        self.devices = FakeDeviceDirectory(
            [
                DeviceAssignment(SN1, MANUFACTURER, ORG_A, PATIENT_P1),
                DeviceAssignment(SN2, ORG_B),
            ]
        )
        self.trail = RecordingAuditTrail("command")
        self.notifier = RecordingNotifier()
        self.service = self.instance()

    def instance(self) -> CommandService:
        return CommandService(self.commands, self.sessions, self.devices, self.trail, self.notifier, self.clock)

    def events(self, resource: str = "") -> list[AuditEvent]:
        return [e for e in self.trail.events if not resource or e.resource == resource]

    def stored(self, name: str) -> Command:
        device_id, command_id = parse_command_name(name)
        return self.commands.items[f"{device_id}/{command_id}"]


@pytest.fixture
def world() -> World:
    return World()


async def as_(principal: Principal, call: Awaitable[T]) -> T:
    with acting_as(principal):
        return await call


async def refused(principal: Principal, call: Awaitable[Any], error: type[DomainError], reason: str) -> DomainError:
    with pytest.raises(error) as caught:
        await as_(principal, call)
    assert caught.value.reason == reason, caught.value.message
    return caught.value


async def create(world: World, device: str = SN1, by: Principal = OPERATOR_A, **request: Any) -> Command:
    request.setdefault("command_name", "reboot")
    return await as_(by, world.service.create_command(device, CommandRequest(**request)))


async def delivered(world: World, **request: Any) -> Command:
    command = await create(world, **request)
    return await as_(ADAPTER, world.service.mark_delivered(command.name))


async def in_progress(world: World, **request: Any) -> Command:
    command = await delivered(world, **request)
    return await as_(ADAPTER, world.service.report_status(command.name, S.IN_PROGRESS, None, ""))


# --- creating ---------------------------------------------------------------------------------


@pytest.mark.parametrize("by", [PLATFORM_ADMIN, ADMIN_A, OPERATOR_A, CLINICIAN_A])
async def test_create_belongs_to_the_data_organization(world: World, by: Principal) -> None:
    command = await create(world, by=by, parameters={"delay": 5}, timeout=timedelta(seconds=30))

    assert command.organization == ORG_A  # the care organization, not the manufacturer that owns SN-1
    assert (command.state, command.creator, command.parameters) == (S.PENDING, by.subject, {"delay": 5})
    assert command.expire_time == AT + timedelta(hours=1)
    assert world.stored(command.name) == command
    [event] = world.events()
    assert (event.organization, event.resource, event.actor.subject) == (ORG_A, command.name, by.subject)
    assert world.notifier.notified == [command]


async def test_an_unassigned_devices_commands_belong_to_its_owner(world: World) -> None:
    command = await create(world, SN2, by=CLINICIAN_B)

    assert command.organization == ORG_B


@pytest.mark.parametrize(
    ("by", "device", "error", "reason"),
    [
        (PATIENT_A, SN1, PermissionDenied, "ROLE_NOT_ALLOWED"),
        (CLINICIAN_B, SN1, PermissionDenied, "ORGANIZATION_ACCESS_DENIED"),
        # The owner's staff do not command a device in another organization's care.
        (OPERATOR_MANUFACTURER, SN1, PermissionDenied, "ORGANIZATION_ACCESS_DENIED"),
        (OPERATOR_A, SN2, PermissionDenied, "ORGANIZATION_ACCESS_DENIED"),
        # An unknown device looks like another organization's to anyone but platform admins.
        (OPERATOR_A, "devices/nobody", PermissionDenied, "ORGANIZATION_ACCESS_DENIED"),
        (PLATFORM_ADMIN, "devices/nobody", NotFound, "DEVICE_NOT_FOUND"),
    ],
)
async def test_create_refused(world: World, by: Principal, device: str, error: type[DomainError], reason: str) -> None:
    await refused(by, world.service.create_command(device, CommandRequest("reboot")), error, reason)

    assert world.commands.items == {}
    assert world.events() == []


async def test_create_while_the_device_registry_is_down(world: World) -> None:
    world.devices.unavailable = True

    await refused(
        OPERATOR_A,
        world.service.create_command(SN1, CommandRequest("reboot")),
        Unavailable,
        "DEVICE_SERVICE_UNAVAILABLE",
    )


async def test_bad_input_after_access(world: World) -> None:
    await refused(
        OPERATOR_A,
        world.service.create_command(SN1, CommandRequest("session.start")),
        InvalidArgument,
        "RESERVED_COMMAND_NAME",
    )
    # Access first: an outsider learns nothing, not even that the request was malformed.
    await refused(
        CLINICIAN_B,
        world.service.create_command(SN1, CommandRequest("session.start")),
        PermissionDenied,
        "ORGANIZATION_ACCESS_DENIED",
    )


async def test_a_retried_create_with_an_id_is_not_queued_twice(world: World) -> None:
    first = await as_(OPERATOR_A, world.service.create_command(SN1, CommandRequest("reboot"), "reboot-1"))

    await refused(
        OPERATOR_A,
        world.service.create_command(SN1, CommandRequest("reboot"), "reboot-1"),
        AlreadyExists,
        "COMMAND_ALREADY_EXISTS",
    )

    assert first.name == "devices/SN-1/commands/reboot-1"
    assert len(world.commands.items) == 1
    assert len(world.events()) == 1


async def test_a_devices_queue_is_bounded(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "MAX_PENDING_PER_DEVICE", 2)
    await create(world)
    await create(world)

    await refused(
        OPERATOR_A,
        world.service.create_command(SN1, CommandRequest("reboot")),
        ResourceExhausted,
        "TOO_MANY_PENDING_COMMANDS",
    )
    # Another device's queue is its own.
    await create(world, SN2, by=CLINICIAN_B)


async def test_a_devices_waiting_commands_are_counted_once_per_period(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted: list[str] = []
    count_pending = world.commands.count_pending

    async def counting(device: str) -> int:
        counted.append(device)
        return await count_pending(device)

    monkeypatch.setattr(world.commands, "count_pending", counting)
    monkeypatch.setattr(service_module, "MAX_PENDING_PER_DEVICE", 3)

    for _ in range(3):
        await create(world)  # one count, then this instance's own creates keep it up to date
    await refused(
        OPERATOR_A,
        world.service.create_command(SN1, CommandRequest("reboot")),
        ResourceExhausted,
        "TOO_MANY_PENDING_COMMANDS",
    )
    assert counted == [SN1]
    world.clock.advance(service_module.PENDING_COUNT_PERIOD.total_seconds())
    await refused(
        OPERATOR_A,
        world.service.create_command(SN1, CommandRequest("reboot")),
        ResourceExhausted,
        "TOO_MANY_PENDING_COMMANDS",
    )
    assert counted == [SN1, SN1]  # read again once the period is over


async def test_a_failing_notifier_does_not_fail_the_create(world: World) -> None:
    world.notifier.failing = True

    command = await create(world)

    assert world.stored(command.name).state is S.PENDING


# --- reading ----------------------------------------------------------------------------------


async def test_get_is_for_the_commands_organization(world: World) -> None:
    command = await create(world)

    for reader in (ADMIN_A, OPERATOR_A, CLINICIAN_A, PLATFORM_ADMIN):
        assert await as_(reader, world.service.get_command(command.name)) == command
    await refused(PATIENT_A, world.service.get_command(command.name), PermissionDenied, "ROLE_NOT_ALLOWED")
    await refused(CLINICIAN_B, world.service.get_command(command.name), PermissionDenied, "ORGANIZATION_ACCESS_DENIED")


async def test_permission_denied_before_not_found(world: World) -> None:
    missing = "devices/SN-1/commands/nothing"

    await refused(CLINICIAN_B, world.service.get_command(missing), PermissionDenied, "ORGANIZATION_ACCESS_DENIED")
    await refused(OPERATOR_A, world.service.get_command(missing), PermissionDenied, "ORGANIZATION_ACCESS_DENIED")
    await refused(PLATFORM_ADMIN, world.service.get_command(missing), NotFound, "COMMAND_NOT_FOUND")


async def test_list_is_scoped_to_the_callers_organization(world: World) -> None:
    ours = [await create(world)]
    world.clock.advance(1)  # generated ids sort by creation time, to the millisecond
    ours.append(await create(world, command_name="calibrate"))
    world.clock.advance(1)
    world.devices.assignments[SN1] = DeviceAssignment(SN1, MANUFACTURER, ORG_B)  # the device moves to b
    theirs = await create(world, by=CLINICIAN_B)

    page = await as_(OPERATOR_A, world.service.list_commands(SN1, "", 0, ""))
    assert page.commands == ours
    page = await as_(CLINICIAN_B, world.service.list_commands(SN1, "", 0, ""))
    assert page.commands == [theirs]
    page = await as_(PLATFORM_ADMIN, world.service.list_commands(SN1, "", 0, ""))
    assert page.commands == [*ours, theirs]
    await refused(PATIENT_A, world.service.list_commands(SN1, "", 0, ""), PermissionDenied, "ROLE_NOT_ALLOWED")


async def test_list_filters_and_pages(world: World) -> None:
    first = await create(world)
    world.clock.advance(1)
    second = await create(world, command_name="calibrate")
    await as_(OPERATOR_A, world.service.cancel_command(first.name))

    async def names(filter_text: str) -> list[str]:
        page = await as_(OPERATOR_A, world.service.list_commands(SN1, filter_text, 0, ""))
        return [c.name for c in page.commands]

    assert await names("state = CANCELED") == [first.name]
    assert await names("state = STATE_PENDING") == [second.name]
    assert await names('command_name = "calibrate"') == [second.name]
    assert await names('create_time > "2026-03-01T12:00:00.5Z"') == [second.name]
    page = await as_(OPERATOR_A, world.service.list_commands(SN1, "", 1, ""))
    assert [c.name for c in page.commands] == [first.name]
    rest = await as_(OPERATOR_A, world.service.list_commands(SN1, "", 1, page.next_page_token))
    assert [c.name for c in rest.commands] == [second.name]
    assert rest.next_page_token == ""
    await refused(
        OPERATOR_A, world.service.list_commands(SN1, "state = DONE", 0, ""), InvalidArgument, "INVALID_FILTER"
    )
    await refused(
        OPERATOR_A, world.service.list_commands(SN1, 'creator = "x"', 0, ""), InvalidArgument, "INVALID_FILTER"
    )


# --- waiting ----------------------------------------------------------------------------------


def waiting(
    world: World, command: Command, state: CommandState | None = None, within: float = 5
) -> asyncio.Task[Command]:
    call = world.service.wait_command(command.name, state, timedelta(seconds=within))
    return asyncio.create_task(as_(OPERATOR_A, call))


async def test_a_waiter_is_answered_by_a_change_in_its_instance_without_reading_again(world: World) -> None:
    command = await delivered(world)
    waiter = waiting(world, command)
    await asyncio.sleep(0.01)
    reads = world.commands.reads

    done = await as_(ADAPTER, world.service.report_status(command.name, S.COMPLETED, {"ok": 1}, ""))

    started = time.monotonic()
    assert await waiter == done
    assert time.monotonic() - started < 0.04  # at once, not at the first recheck (50 ms)
    assert world.commands.reads == reads + 1  # the report's own read only


async def test_a_waiter_waits_through_steps_that_are_not_final(world: World) -> None:
    command = await delivered(world)
    waiter = waiting(world, command)
    await as_(ADAPTER, world.service.report_status(command.name, S.IN_PROGRESS, None, ""))
    await asyncio.sleep(0.01)
    assert not waiter.done()

    await as_(ADAPTER, world.service.report_status(command.name, S.FAILED, None, "jammed"))

    assert (await waiter).state is S.FAILED


async def test_a_waiter_with_a_known_state_is_answered_by_the_next_one(world: World) -> None:
    command = await create(world)
    assert await as_(OPERATOR_A, world.service.wait_command(command.name, S.DELIVERED, None)) == command  # left it

    waiter = waiting(world, command, S.PENDING)
    delivery = await as_(ADAPTER, world.service.mark_delivered(command.name))

    assert await waiter == delivery


async def test_a_change_by_another_instance_is_seen_by_reading_again(world: World) -> None:
    command = await delivered(world)
    waiter = waiting(world, command)
    started = time.monotonic()
    await asyncio.sleep(0.01)  # waiting, not yet rechecked

    done = await as_(ADAPTER, world.instance().report_status(command.name, S.COMPLETED, None, ""))

    assert await waiter == done
    assert 0.05 <= time.monotonic() - started < 0.5  # the first recheck, after 50 ms


async def test_a_wait_ends_after_its_time_with_the_command_as_it_is(world: World) -> None:
    command = await create(world)
    started = time.monotonic()

    assert await waiting(world, command, within=0.3) == command

    assert 0.3 <= time.monotonic() - started < 0.6
    assert await as_(OPERATOR_A, world.service.wait_command(command.name, None, timedelta(0))) == command


async def test_a_wait_is_for_those_who_may_read_the_command(world: World) -> None:
    command = await create(world)
    no_wait = timedelta(0)

    await refused(
        PATIENT_A, world.service.wait_command(command.name, None, no_wait), PermissionDenied, "ROLE_NOT_ALLOWED"
    )
    await refused(
        CLINICIAN_B,
        world.service.wait_command(command.name, None, no_wait),
        PermissionDenied,
        "ORGANIZATION_ACCESS_DENIED",
    )


async def test_waiters_are_limited_per_instance(world: World) -> None:
    command = await create(world)
    service = CommandService(
        world.commands, world.sessions, world.devices, world.trail, world.notifier, world.clock, CommandWatch(1)
    )
    first = asyncio.create_task(as_(OPERATOR_A, service.wait_command(command.name, None, timedelta(seconds=5))))
    await asyncio.sleep(0.01)

    await refused(OPERATOR_A, service.wait_command(command.name, None, None), ResourceExhausted, "TOO_MANY_WAITERS")
    first.cancel()


# --- cancel and stop --------------------------------------------------------------------------


async def test_cancel_a_pending_command(world: World) -> None:
    command = await create(world)
    world.clock.advance(2)

    canceled = await as_(CLINICIAN_A, world.service.cancel_command(command.name))
    again = await as_(CLINICIAN_A, world.service.cancel_command(command.name))

    assert (canceled.state, canceled.complete_time) == (S.CANCELED, AT + timedelta(seconds=2))
    assert again == canceled  # idempotent, and not audited twice
    assert [e.description for e in world.events(command.name)] == [
        "command reboot created",
        "command PENDING -> CANCELED",
    ]
    assert world.notifier.notified[-1] == canceled
    # Never delivered: nothing to tell the device.
    pending = await as_(ADAPTER, world.service.list_pending(SN1))
    assert (pending.commands, pending.cancellations) == ([], [])


async def test_a_command_canceled_after_delivery_is_announced_until_its_deadline(world: World) -> None:
    command = await delivered(world)

    canceled = await as_(OPERATOR_A, world.service.cancel_command(command.name))

    pending = await as_(ADAPTER, world.service.list_pending(SN1))
    assert pending.cancellations == [canceled]
    world.clock.advance(61)
    pending = await as_(ADAPTER, world.service.list_pending(SN1))
    assert pending.cancellations == []


async def test_a_command_in_progress_is_stopped_not_canceled(world: World) -> None:
    command = await in_progress(world)

    await refused(OPERATOR_A, world.service.cancel_command(command.name), FailedPrecondition, "COMMAND_IN_PROGRESS")
    stopped = await as_(OPERATOR_A, world.service.stop_command(command.name))
    again = await as_(OPERATOR_A, world.service.stop_command(command.name))

    assert (stopped.state, stopped.stop_requested, stopped.stop_request_time) == (S.IN_PROGRESS, True, AT)
    assert again == stopped
    assert world.notifier.notified[-1] == stopped
    assert [e.description for e in world.events(command.name)][-1] == "command stop requested"
    assert sum(e.description == "command stop requested" for e in world.events()) == 1
    pending = await as_(ADAPTER, world.service.list_pending(SN1))
    assert pending.stop_requests == [stopped]
    # The device obeys: it ends the command, and the stop request is no longer listed.
    finished = await as_(ADAPTER, world.service.report_status(command.name, S.FAILED, None, "stopped by request"))
    assert (finished.state, finished.error_message) == (S.FAILED, "stopped by request")
    assert (await as_(ADAPTER, world.service.list_pending(SN1))).stop_requests == []


async def test_stop_before_the_device_started(world: World) -> None:
    command = await create(world)

    await refused(OPERATOR_A, world.service.stop_command(command.name), FailedPrecondition, "COMMAND_NOT_STARTED")


async def test_cancel_and_stop_need_access(world: World) -> None:
    command = await create(world)

    await refused(
        CLINICIAN_B, world.service.cancel_command(command.name), PermissionDenied, "ORGANIZATION_ACCESS_DENIED"
    )
    await refused(PATIENT_A, world.service.stop_command(command.name), PermissionDenied, "ROLE_NOT_ALLOWED")
    assert world.stored(command.name).state is S.PENDING


# --- the adapter's calls ----------------------------------------------------------------------


@pytest.mark.parametrize("by", [OPERATOR_A, PLATFORM_ADMIN])
async def test_internal_methods_are_for_the_adapter_only(world: World, by: Principal) -> None:
    command = await create(world)

    await refused(by, world.service.list_pending(SN1), PermissionDenied, "INTERNAL_ONLY")
    await refused(by, world.service.mark_delivered(command.name), PermissionDenied, "INTERNAL_ONLY")
    await refused(
        by, world.service.report_status(command.name, S.COMPLETED, None, ""), PermissionDenied, "INTERNAL_ONLY"
    )


async def test_pending_oldest_first_without_expired_ones(world: World) -> None:
    short = await create(world, ttl=timedelta(seconds=5))
    world.clock.advance(1)
    older = await create(world)
    world.clock.advance(1)
    newer = await create(world)
    await create(world, SN2, by=CLINICIAN_B)
    world.clock.advance(4)  # `short` expired; no sweep has run yet

    pending = await as_(ADAPTER, world.service.list_pending(SN1))
    limited = await as_(ADAPTER, world.service.list_pending(SN1, page_size=1))

    assert pending.commands == [older, newer]
    assert limited.commands == [older]
    assert world.stored(short.name).state is S.PENDING


async def test_mark_delivered_starts_the_deadline_once(world: World) -> None:
    command = await create(world, timeout=timedelta(seconds=30))
    world.clock.advance(10)

    first = await as_(ADAPTER, world.service.mark_delivered(command.name))
    world.clock.advance(1)
    second = await as_(ADAPTER, world.service.mark_delivered(command.name))

    assert (first.state, first.deliver_time, first.deadline) == (
        S.DELIVERED,
        AT + timedelta(seconds=10),
        AT + timedelta(seconds=40),
    )
    assert second == first
    assert [e.description for e in world.events(command.name)] == [
        "command reboot created",
        "command PENDING -> DELIVERED",
    ]
    assert (await as_(ADAPTER, world.service.list_pending(SN1))).commands == []


async def test_mark_delivered_of_a_canceled_command_tells_the_adapter(world: World) -> None:
    command = await create(world)
    await as_(OPERATOR_A, world.service.cancel_command(command.name))

    error = await refused(ADAPTER, world.service.mark_delivered(command.name), FailedPrecondition, "COMMAND_CANCELED")

    assert "CANCELED" in error.message


async def test_mark_delivered_after_the_ttl_expires_the_command(world: World) -> None:
    command = await create(world, ttl=timedelta(seconds=5))
    world.clock.advance(5)

    await refused(ADAPTER, world.service.mark_delivered(command.name), FailedPrecondition, "COMMAND_EXPIRED")

    assert world.stored(command.name).state is S.EXPIRED


async def test_mark_delivered_of_an_unknown_command(world: World) -> None:
    await refused(ADAPTER, world.service.mark_delivered("devices/SN-1/commands/nothing"), NotFound, "COMMAND_NOT_FOUND")


async def test_reports_complete_a_command(world: World) -> None:
    command = await in_progress(world)
    world.clock.advance(3)

    done = await as_(ADAPTER, world.service.report_status(command.name, S.COMPLETED, {"uptime": 12}, ""))
    repeated = await as_(ADAPTER, world.service.report_status(command.name, S.COMPLETED, {"uptime": 12}, ""))
    late_start = await as_(ADAPTER, world.service.report_status(command.name, S.IN_PROGRESS, None, ""))

    assert (done.state, done.result, done.complete_time) == (S.COMPLETED, {"uptime": 12}, AT + timedelta(seconds=3))
    assert repeated == done == late_start
    assert [e.description for e in world.events(command.name)] == [
        "command reboot created",
        "command PENDING -> DELIVERED",
        "command DELIVERED -> IN_PROGRESS",
        "command IN_PROGRESS -> COMPLETED",
    ]
    assert all(e.actor.subject == "internal:mqtt_adapter" for e in world.events(command.name)[1:])
    await refused(
        ADAPTER,
        world.service.report_status(command.name, S.FAILED, None, "x"),
        FailedPrecondition,
        "COMMAND_ALREADY_FINISHED",
    )


async def test_a_report_after_the_deadline_is_refused_even_before_a_sweep(world: World) -> None:
    command = await in_progress(world)
    world.clock.advance(60)

    error = await refused(
        ADAPTER,
        world.service.report_status(command.name, S.COMPLETED, None, ""),
        FailedPrecondition,
        "COMMAND_TIMED_OUT",
    )

    assert "did not finish within 60s" in error.message  # what the device logs
    assert world.stored(command.name).state is S.TIMED_OUT


# --- deadlines --------------------------------------------------------------------------------


async def test_the_sweeper_times_out_and_expires(world: World) -> None:
    running = await in_progress(world, timeout=timedelta(seconds=10))
    waiting = await create(world, ttl=timedelta(seconds=20))
    fine = await create(world)
    world.clock.advance(9)

    assert (await world.service.sweep()).commands_changed == 0
    world.clock.advance(1)
    assert (await world.service.sweep()).commands_changed == 1
    world.clock.advance(10)
    assert (await world.service.sweep()).commands_changed == 1
    assert (await world.service.sweep()).commands_changed == 0

    assert world.stored(running.name).state is S.TIMED_OUT
    assert world.stored(running.name).complete_time == AT + timedelta(seconds=10)
    assert world.stored(waiting.name).state is S.EXPIRED
    assert world.stored(fine.name).state is S.PENDING
    sweeps = [e for e in world.events() if e.actor.subject == "internal:command-sweeper"]
    assert [(e.resource, e.description, e.organization) for e in sweeps] == [
        (running.name, "command IN_PROGRESS -> TIMED_OUT", ORG_A),
        (waiting.name, "command PENDING -> EXPIRED", ORG_A),
    ]


async def test_a_deadline_that_passed_while_no_instance_ran_is_applied_by_the_next_one(world: World) -> None:
    command = await delivered(world)
    world.service = None  # type: ignore[assignment]  # the instance that delivered it is gone
    world.clock.advance(3600)

    restarted = world.instance()
    result = await restarted.sweep()

    assert result.commands_changed == 1
    assert world.stored(command.name).state is S.TIMED_OUT
    assert world.stored(command.name).complete_time == command.deadline


async def test_two_instances_sweeping_at_once_time_a_command_out_once(world: World) -> None:
    command = await delivered(world)
    world.clock.advance(61)
    other = world.instance()

    async def other_instance_first(_: Command) -> None:
        world.commands.before_next_claim = None
        assert (await other.sweep()).commands_changed == 1

    world.commands.before_next_claim = other_instance_first
    result = await world.service.sweep()

    assert result.commands_changed == 0  # lost the claim, found nothing left to do
    assert world.stored(command.name).state is S.TIMED_OUT
    assert world.stored(command.name).revision == 3
    assert [e.description for e in world.events(command.name)].count("command DELIVERED -> TIMED_OUT") == 1


async def test_a_device_report_racing_the_sweeper_has_one_winner(world: World) -> None:
    command = await in_progress(world)
    world.clock.advance(59)

    async def sweeper_first(_: Command) -> None:
        world.clock.advance(1)
        await world.instance().sweep()
        world.clock.advance(-1)

    world.commands.before_next_claim = sweeper_first
    await refused(
        ADAPTER, world.service.report_status(command.name, S.COMPLETED, {}, ""), FailedPrecondition, "COMMAND_TIMED_OUT"
    )

    stored = world.stored(command.name)
    assert (stored.state, stored.result) == (S.TIMED_OUT, None)
    finals = [e for e in world.events(command.name) if e.description.endswith(("COMPLETED", "TIMED_OUT"))]
    assert len(finals) == 1


async def test_a_cancel_racing_the_delivery_still_cancels(world: World) -> None:
    command = await create(world)

    async def delivered_first(_: Command) -> None:
        await as_(ADAPTER, world.instance().mark_delivered(command.name))

    world.commands.before_next_claim = delivered_first
    canceled = await as_(OPERATOR_A, world.service.cancel_command(command.name))

    assert canceled.state is S.CANCELED
    assert canceled.deliver_time is not None  # so the device is told it was canceled
    assert [e.description for e in world.events(command.name)][1:] == [
        "command PENDING -> DELIVERED",
        "command DELIVERED -> CANCELED",
    ]


async def test_a_writer_that_stopped_after_its_claim_is_rolled_forward(world: World) -> None:
    command = await create(world)
    world.commands.write_claimed = False
    await as_(ADAPTER, world.service.mark_delivered(command.name))
    world.commands.write_claimed = True
    assert world.stored(command.name).state is S.PENDING  # the document itself was not written

    seen = await as_(OPERATOR_A, world.service.get_command(command.name))

    assert seen.state is S.DELIVERED
    assert world.stored(command.name).state is S.DELIVERED


async def test_a_change_on_a_stale_read_loses_its_claim_and_starts_again_from_the_latest(world: World) -> None:
    command = await delivered(world)
    world.commands.write_claimed = False  # IN_PROGRESS is claimed, its document not yet written
    await as_(ADAPTER, world.service.report_status(command.name, S.IN_PROGRESS, None, ""))
    world.commands.write_claimed = True

    completed = await as_(ADAPTER, world.instance().report_status(command.name, S.COMPLETED, {"ok": True}, ""))

    assert (completed.state, completed.revision) == (S.COMPLETED, 4)
    assert [e.description for e in world.events(command.name)][2:] == [
        "command DELIVERED -> IN_PROGRESS",
        "command IN_PROGRESS -> COMPLETED",
    ]


async def test_nothing_to_do_on_a_stale_read_is_checked_against_the_latest(world: World) -> None:
    command = await delivered(world)
    world.commands.write_claimed = False
    await as_(ADAPTER, world.service.report_status(command.name, S.IN_PROGRESS, None, ""))
    world.commands.write_claimed = True
    assert world.stored(command.name).state is S.DELIVERED

    # Delivered already, says the stored document; the command is in fact running.
    again = await as_(ADAPTER, world.instance().mark_delivered(command.name))

    assert again.state is S.IN_PROGRESS
    assert world.stored(command.name).state is S.IN_PROGRESS


async def test_a_command_that_keeps_changing_is_aborted(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    command = await create(world)
    always_taken = world.commands.claim

    async def lose(resource: Command) -> bool:
        return False

    monkeypatch.setattr(world.commands, "claim", lose)
    with pytest.raises(DomainError) as caught:
        await as_(OPERATOR_A, world.service.cancel_command(command.name))
    monkeypatch.setattr(world.commands, "claim", always_taken)

    assert (caught.value.code, caught.value.reason) == ("ABORTED", "CONCURRENT_CHANGE")


# --- sessions ---------------------------------------------------------------------------------


async def start(world: World, by: Principal = CLINICIAN_A, **request: Any) -> Session:
    request.setdefault("parameters", {"mode": "therapy"})
    return await as_(by, world.service.start_session(SN1, SessionRequest(**request)))


async def device_completes(world: World, command_name: str, state: CommandState = S.COMPLETED) -> Command:
    await as_(ADAPTER, world.service.mark_delivered(command_name))
    return await as_(
        ADAPTER, world.service.report_status(command_name, state, None, "" if state is S.COMPLETED else "no")
    )


async def session_of(world: World, session: Session) -> Session:
    return await as_(CLINICIAN_A, world.service.get_session(session.name))


async def test_a_session_from_start_to_stop(world: World) -> None:
    session = await start(world)

    assert (session.state, session.organization, session.patient) == (SessionState.STARTING, ORG_A, PATIENT_P1)
    start_command = world.stored(session.current_command)
    assert (start_command.command_name, start_command.session) == (START_COMMAND, session.name)
    assert start_command.parameters == {"mode": "therapy", "session": session.name}
    assert world.notifier.notified == [start_command]

    await device_completes(world, session.current_command)
    assert (await session_of(world, session)).state is SessionState.ACTIVE

    pausing = await as_(CLINICIAN_A, world.service.pause_session(session.name))
    assert pausing.state is SessionState.PAUSING
    assert world.stored(pausing.current_command).command_name == "session.pause"
    assert (await as_(CLINICIAN_A, world.service.pause_session(session.name))) == pausing  # asked twice
    await device_completes(world, pausing.current_command)
    assert (await session_of(world, session)).state is SessionState.PAUSED

    resuming = await as_(OPERATOR_A, world.service.resume_session(session.name))
    await device_completes(world, resuming.current_command)
    assert (await session_of(world, session)).state is SessionState.ACTIVE

    stopping = await as_(CLINICIAN_A, world.service.stop_session(session.name))
    assert world.stored(stopping.current_command).parameters == {"session": session.name}
    await device_completes(world, stopping.current_command)
    stopped = await session_of(world, session)
    assert (stopped.state, stopped.end_time, stopped.active_time) == (SessionState.STOPPED, AT, AT)

    assert [e.description for e in world.events(session.name)] == [
        "session STARTING",
        "session STARTING -> ACTIVE",
        "session ACTIVE -> PAUSING",
        "session PAUSING -> PAUSED",
        "session PAUSED -> RESUMING",
        "session RESUMING -> ACTIVE",
        "session ACTIVE -> STOPPING",
        "session STOPPING -> STOPPED",
    ]
    assert all(e.organization == ORG_A for e in world.events())


async def test_a_failed_pause_leaves_the_session_active(world: World) -> None:
    session = await start(world)
    await device_completes(world, session.current_command)
    pausing = await as_(CLINICIAN_A, world.service.pause_session(session.name))

    await device_completes(world, pausing.current_command, S.FAILED)

    active = await session_of(world, session)
    assert (active.state, active.error_message) == (SessionState.ACTIVE, "session.pause FAILED: no")


async def test_a_session_whose_start_times_out_fails(world: World) -> None:
    session = await start(world, command_timeout=timedelta(seconds=5))
    await as_(ADAPTER, world.service.mark_delivered(session.current_command))
    world.clock.advance(5)

    result = await world.service.sweep()

    assert (result.commands_changed, result.sessions_changed) == (1, 0)  # settled with the command
    failed = await session_of(world, session)
    assert failed.state is SessionState.FAILED
    assert failed.error_message.startswith("session.start TIMED_OUT")


async def test_stop_while_starting_queues_behind_the_start(world: World) -> None:
    session = await start(world)
    start_command = session.current_command

    stopping = await as_(CLINICIAN_A, world.service.stop_session(session.name))
    pending = await as_(ADAPTER, world.service.list_pending(SN1))
    assert [c.name for c in pending.commands] == [start_command, stopping.current_command]
    # The start completing no longer matters: the session waits for its stop.
    await device_completes(world, start_command)
    assert (await session_of(world, session)).state is SessionState.STOPPING
    await device_completes(world, stopping.current_command)
    assert (await session_of(world, session)).state is SessionState.STOPPED


async def test_session_refusals(world: World) -> None:
    session = await start(world)

    await refused(CLINICIAN_A, world.service.pause_session(session.name), FailedPrecondition, "SESSION_STARTING")
    await refused(CLINICIAN_B, world.service.stop_session(session.name), PermissionDenied, "ORGANIZATION_ACCESS_DENIED")
    await refused(PATIENT_A, world.service.get_session(session.name), PermissionDenied, "ROLE_NOT_ALLOWED")
    await refused(
        OPERATOR_A,
        world.service.get_session("devices/SN-1/sessions/none"),
        PermissionDenied,
        "ORGANIZATION_ACCESS_DENIED",
    )
    await refused(
        PLATFORM_ADMIN, world.service.get_session("devices/SN-1/sessions/none"), NotFound, "SESSION_NOT_FOUND"
    )
    await refused(
        CLINICIAN_B, world.service.start_session(SN1, SessionRequest()), PermissionDenied, "ORGANIZATION_ACCESS_DENIED"
    )


async def test_list_sessions(world: World) -> None:
    first = await start(world)
    second = await start(world)
    await device_completes(world, first.current_command)

    page = await as_(OPERATOR_A, world.service.list_sessions(SN1, "state = ACTIVE", 0, ""))
    assert [s.name for s in page.sessions] == [first.name]
    page = await as_(OPERATOR_A, world.service.list_sessions(SN1, f'patient = "{PATIENT_P1}"', 0, ""))
    assert [s.name for s in page.sessions] == [first.name, second.name]
    page = await as_(CLINICIAN_B, world.service.list_sessions(SN1, "", 0, ""))
    assert page.sessions == []


async def test_the_sweeper_settles_a_session_left_behind(world: World) -> None:
    session = await start(world)
    # The instance that recorded the device's report stopped before it settled the session.
    command = world.stored(session.current_command)
    world.commands.put(command.finished(S.COMPLETED, AT, None, ""))
    world.clock.advance(4)
    assert (await world.service.sweep()).sessions_changed == 0  # within the grace period

    world.clock.advance(1)
    assert (await world.service.sweep()).sessions_changed == 1

    assert (await session_of(world, session)).state is SessionState.ACTIVE


async def test_the_sweeper_fails_a_session_whose_command_was_never_created(world: World) -> None:
    session = await start(world)
    del world.commands.items[world.stored(session.current_command).id]
    world.clock.advance(10)
    assert (await world.service.sweep()).sessions_changed == 0

    world.clock.advance(20)
    assert (await world.service.sweep()).sessions_changed == 1

    failed = await session_of(world, session)
    assert (failed.state, failed.error_message) == (SessionState.FAILED, "the session command was never created")


async def test_sweeps_without_session_repair(world: World) -> None:
    session = await start(world)
    del world.commands.items[world.stored(session.current_command).id]
    world.clock.advance(60)

    assert (await world.service.sweep(repair_sessions=False)).sessions_changed == 0
