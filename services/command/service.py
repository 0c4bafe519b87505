"""Use cases of the command service: who may command a device, and every change of a command
or a session, made so that concurrent writers cannot corrupt it.

Tenancy: a command (and a session) belongs to its device's data organization at creation (the
device's care organization, else its owner). Names carry no organization, so, as in the device
registry, a caller who is not a platform admin is told PERMISSION_DENIED alike for another
organization's command and for one that does not exist.

Concurrency: every change is a pure function of the current resource (services.command.domain)
applied through `claim` (see services.command.repository): the writer that claims the next
revision wins, the others read again and usually find nothing left to do. Only the winner
audits, so each change is audited once even when several instances sweep the same deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import Principal, Role, acting_as, current_principal, internal_principal
from medmesh.runtime.directories import DeviceAssignment, DeviceDirectory
from medmesh.runtime.errors import (
    Aborted,
    DomainError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from medmesh.runtime.filtering import Condition, Converter, rfc3339_timestamp
from medmesh.runtime.resources import ResourceStore, list_page, now
from services.command.domain import (
    START_COMMAND,
    Command,
    CommandRequest,
    CommandState,
    Session,
    SessionAction,
    SessionRequest,
    SessionState,
    cancel_change,
    cancel_refusal,
    delivery_change,
    delivery_refusal,
    lapsed,
    new_command,
    new_id,
    new_session,
    parse_command_name,
    parse_device,
    parse_session_name,
    report_change,
    report_refusal,
    session_action_change,
    session_action_refusal,
    session_command_missing,
    session_outcome,
    stop_change,
    stop_refusal,
    storage_key,
)
from services.command.notifier import CommandNotifier, NoCommandNotifier
from services.command.watch import CommandWatch

log = logging.getLogger(__name__)

READ_ROLES = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.OPERATOR, Role.CLINICIAN)
# Clinicians run remote sessions, so they may command their organization's devices too.
WRITE_ROLES = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.OPERATOR, Role.CLINICIAN)
# Queued for one device and not yet delivered; a device offline for long should not pile up more.
MAX_PENDING_PER_DEVICE = 1000
# Counting them is a scan on FerretDB (about 60 us per stored command: 300 ms at 5,000, on every
# create), so a device's count is read at most this often and kept up with this instance's own
# creates in between. Across instances the limit is approximate, which is all it needs to be.
PENDING_COUNT_PERIOD = timedelta(seconds=5)
MAX_COUNTED_DEVICES = 100_000
DEFAULT_PENDING_PAGE = 100
MAX_PENDING_PAGE = 500
MAX_CLAIM_ATTEMPTS = 5
SWEEP_BATCH = 200
MAX_SWEEP_BATCHES = 10
# The repair pass leaves sessions alone this long after their last change: the normal path settles them.
SESSION_REPAIR_GRACE = timedelta(seconds=5)
# A session command still missing this long after the session asked for it was never created.
MISSING_COMMAND_GRACE = timedelta(seconds=30)
SWEEPER = "command-sweeper"
# WaitCommand: how long a caller waits unless it says, and at most (the gateway allows 30 s).
DEFAULT_WAIT = timedelta(seconds=10)
MAX_WAIT = timedelta(seconds=20)
# A change made by another instance is not announced to this one's waiters: they read the
# command again after 50 ms, then after twice as long each time, at most every second.
FIRST_RECHECK_SECONDS = 0.05
MAX_RECHECK_SECONDS = 1.0


def _state_name(written: str) -> str:
    # Both `COMPLETED` and the JSON enum name `STATE_COMPLETED` are accepted.
    return written.upper().removeprefix("STATE_")


def _command_state(written: str) -> str:
    return CommandState(_state_name(written)).value


def _session_state(written: str) -> str:
    return SessionState(_state_name(written)).value


COMMAND_FILTERS: dict[str, tuple[str, Converter]] = {
    "state": ("state", _command_state),
    "command_name": ("command_name", str),
    "session": ("session", str),
    "create_time": ("create_time", rfc3339_timestamp),
}
SESSION_FILTERS: dict[str, tuple[str, Converter]] = {
    "state": ("state", _session_state),
    "patient": ("patient", str),
    "create_time": ("create_time", rfc3339_timestamp),
}


class CommandStore(ResourceStore[Command], Protocol):
    async def read(self, resource_id: str) -> Command | None: ...
    async def claim(self, resource: Command) -> bool: ...
    async def store(self, resource: Command) -> None: ...
    async def pending(self, device: str, at: datetime, limit: int) -> list[Command]: ...
    async def count_pending(self, device: str) -> int: ...
    async def stop_requests(self, device: str) -> list[Command]: ...
    async def cancellations(self, device: str, at: datetime) -> list[Command]: ...
    async def lapsed(self, at: datetime, limit: int) -> list[Command]: ...
    async def forget_cancellations(self, at: datetime) -> None: ...
    async def forget_if_finished(self, command: Command) -> None: ...


class SessionStore(ResourceStore[Session], Protocol):
    async def claim(self, resource: Session) -> bool: ...
    async def store(self, resource: Session) -> None: ...
    async def awaiting_command(self, changed_before: datetime, limit: int) -> list[Session]: ...


@dataclass(frozen=True)
class CommandPage:
    commands: list[Command]
    next_page_token: str


@dataclass(frozen=True)
class SessionPage:
    sessions: list[Session]
    next_page_token: str


@dataclass(frozen=True)
class PendingCommands:
    """What a device should be told now (see CommandInternalService.ListPendingCommands)."""

    commands: list[Command]
    stop_requests: list[Command]
    cancellations: list[Command]


@dataclass(frozen=True)
class SweepResult:
    commands_changed: int = 0
    sessions_changed: int = 0


def _denied(principal: Principal, name: str) -> PermissionDenied:
    return PermissionDenied(
        f"{principal.subject} may not access {name}",
        reason="ORGANIZATION_ACCESS_DENIED",
        metadata={"resource": name},
    )


def _command_not_found(name: str) -> NotFound:
    return NotFound(f"command {name!r} does not exist", reason="COMMAND_NOT_FOUND", metadata={"command": name})


def _session_not_found(name: str) -> NotFound:
    return NotFound(f"session {name!r} does not exist", reason="SESSION_NOT_FOUND", metadata={"session": name})


def _command_change(old: Command, new: Command) -> str:
    if old.state is not new.state:
        return f"command {old.state.value} -> {new.state.value}"
    return "command stop requested"


def _session_change(old: Session, new: Session) -> str:
    return f"session {old.state.value} -> {new.state.value}"


def _raise_if(refusal: DomainError | None) -> None:
    if refusal is not None:
        raise refusal


class CommandService:
    def __init__(
        self,
        commands: CommandStore,
        sessions: SessionStore,
        devices: DeviceDirectory,
        trail: AuditTrail,
        notifier: CommandNotifier | None = None,
        clock: Callable[[], datetime] = now,
        watch: CommandWatch | None = None,
    ) -> None:
        self._commands = commands
        self._sessions = sessions
        self._devices = devices
        self._trail = trail
        self._notifier = notifier or NoCommandNotifier()
        self._clock = clock
        self._watch = watch or CommandWatch()
        self._pending_counts: dict[str, tuple[datetime, int]] = {}  # device -> (read at, count since)

    # --- commands: public ---------------------------------------------------------------------

    async def create_command(self, parent: str, request: CommandRequest, command_id: str = "") -> Command:
        principal = current_principal()
        principal.require_role(*WRITE_ROLES, action="create commands")
        device_id = parse_device(parent)
        assignment = await self._assignment(principal, parent)
        command = new_command(
            device_id, assignment.data_organization, request, principal.subject, self._clock(), command_id=command_id
        )
        await self._require_room(parent)
        await self._commands.insert(command)
        # The push to the device first: it goes on in the background while the audit is written.
        await self._notify(command)
        await audit(
            self._trail, command.organization, command.name, description=f"command {command.command_name} created"
        )
        return command

    async def get_command(self, name: str) -> Command:
        return await self._visible_command(name, READ_ROLES, "read commands")

    async def wait_command(self, name: str, state: CommandState | None, within: timedelta | None) -> Command:
        """The command once it has left `state` (None: once it is final), or after `within`
        (None: DEFAULT_WAIT; at most MAX_WAIT) as it is then."""
        device_id, command_id = parse_command_name(name)
        wait = min(DEFAULT_WAIT if within is None else within, MAX_WAIT).total_seconds()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        recheck = FIRST_RECHECK_SECONDS
        # Watching before the first read: a change made in between is not missed.
        with self._watch.watching(storage_key(device_id, command_id)) as changes:
            command = await self._visible_command(name, READ_ROLES, "read commands")
            while not (command.is_terminal if state is None else command.state is not state):
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(min(left, recheck)):
                        changed = await changes.get()
                except TimeoutError:  # perhaps changed by another instance
                    recheck = min(2 * recheck, MAX_RECHECK_SECONDS)
                    command = await self._commands.get(command.id) or command
                    continue
                if changed.revision > command.revision:
                    command = changed
        return command

    async def list_commands(self, parent: str, filter_text: str, page_size: int, page_token: str) -> CommandPage:
        principal = current_principal()
        principal.require_role(*READ_ROLES, action="list commands")
        parse_device(parent)
        commands, token = await list_page(
            self._commands, filter_text, COMMAND_FILTERS, page_size, page_token, self._scope(principal, parent)
        )
        return CommandPage(commands, token)

    async def cancel_command(self, name: str) -> Command:
        command = await self._visible_command(name, WRITE_ROLES, "cancel commands", to_change=True)
        at = self._clock()
        final, changed = await self._change_command(
            command, lambda c: lapsed(c, at) or cancel_change(c, at), fresh=True
        )
        _raise_if(cancel_refusal(final))
        if changed:
            await self._notify(final)
        return final

    async def stop_command(self, name: str) -> Command:
        command = await self._visible_command(name, WRITE_ROLES, "stop commands", to_change=True)
        at = self._clock()
        final, changed = await self._change_command(command, lambda c: lapsed(c, at) or stop_change(c, at), fresh=True)
        _raise_if(stop_refusal(final))
        if changed:
            await self._notify(final)
        return final

    # --- commands: internal (the MQTT adapter) ------------------------------------------------

    async def list_pending(self, device: str, page_size: int = 0) -> PendingCommands:
        _require_internal("list pending commands")
        parse_device(device, "device")
        at = self._clock()
        limit = min(page_size or DEFAULT_PENDING_PAGE, MAX_PENDING_PAGE)
        return PendingCommands(
            commands=await self._commands.pending(device, at, limit),
            stop_requests=await self._commands.stop_requests(device),
            cancellations=await self._commands.cancellations(device, at),
        )

    async def mark_delivered(self, name: str) -> Command:
        _require_internal("mark commands delivered")
        command = await self._find_command(name)
        at = self._clock()
        final, _ = await self._change_command(command, lambda c: lapsed(c, at) or delivery_change(c, at), fresh=True)
        _raise_if(delivery_refusal(final))
        return final

    async def report_status(
        self, name: str, state: CommandState, result: dict[str, Any] | None, error_message: str
    ) -> Command:
        _require_internal("report command status")
        command = await self._find_command(name)
        at = self._clock()
        final, _ = await self._change_command(
            command, lambda c: lapsed(c, at) or report_change(c, state, at, result, error_message), fresh=True
        )
        _raise_if(report_refusal(final, state))
        return final

    # --- sessions -----------------------------------------------------------------------------

    async def start_session(self, parent: str, request: SessionRequest, session_id: str = "") -> Session:
        principal = current_principal()
        principal.require_role(*WRITE_ROLES, action="start sessions")
        device_id = parse_device(parent)
        assignment = await self._assignment(principal, parent)
        at = self._clock()
        session = new_session(
            device_id,
            assignment.data_organization,
            assignment.patient,
            request,
            principal.subject,
            at,
            session_id=session_id,
        )
        await self._require_room(parent)
        # The session first: a session.start command must never name a session that does not exist.
        # Stopping in between leaves a STARTING session without its command; the sweeper fails it.
        await self._sessions.insert(session)
        await audit(self._trail, session.organization, session.name, description="session STARTING")
        await self._create_session_command(session, START_COMMAND, principal, at)
        return session

    async def get_session(self, name: str) -> Session:
        return await self._visible_session(name, READ_ROLES, "read sessions")

    async def list_sessions(self, parent: str, filter_text: str, page_size: int, page_token: str) -> SessionPage:
        principal = current_principal()
        principal.require_role(*READ_ROLES, action="list sessions")
        parse_device(parent)
        sessions, token = await list_page(
            self._sessions, filter_text, SESSION_FILTERS, page_size, page_token, self._scope(principal, parent)
        )
        return SessionPage(sessions, token)

    async def pause_session(self, name: str) -> Session:
        return await self._act_on_session(name, SessionAction.PAUSE)

    async def resume_session(self, name: str) -> Session:
        return await self._act_on_session(name, SessionAction.RESUME)

    async def stop_session(self, name: str) -> Session:
        return await self._act_on_session(name, SessionAction.STOP)

    async def _act_on_session(self, name: str, action: SessionAction) -> Session:
        principal = current_principal()
        session = await self._visible_session(name, WRITE_ROLES, f"{action.value} sessions")
        at = self._clock()
        command_id = new_id(at)
        final, changed = await self._change_session(session, lambda s: session_action_change(s, action, command_id, at))
        if not changed:
            _raise_if(session_action_refusal(final, action))
            return final
        await self._create_session_command(final, action.command_name, principal, at)
        return final

    async def _create_session_command(
        self, session: Session, command_name: str, principal: Principal, at: datetime
    ) -> None:
        _, command_id = parse_command_name(session.current_command, "session.current_command")
        command = new_command(
            session.device_id,
            session.organization,
            session.command_request(command_name),
            principal.subject,
            at,
            command_id=command_id,
            session=session.name,
            field_prefix="session",
        )
        await self._commands.insert(command)
        await self._notify(command)
        await audit(self._trail, command.organization, command.name, description=f"command {command_name} created")

    # --- deadlines ----------------------------------------------------------------------------

    async def sweep(self, *, repair_sessions: bool = True) -> SweepResult:
        """Times out commands past their deadline and expires those past their ttl; with
        `repair_sessions`, also settles sessions whose command ended while no one was there to
        say so (a service stopped between the two writes). Safe to run in every instance at once."""
        with acting_as(internal_principal(SWEEPER)):
            at = self._clock()
            commands_changed = await self._sweep_commands(at)
            sessions_changed = await self._repair_sessions(at) if repair_sessions else 0
        return SweepResult(commands_changed, sessions_changed)

    async def _sweep_commands(self, at: datetime) -> int:
        await self._commands.forget_cancellations(at)
        changed = 0
        seen: set[str] = set()
        for _ in range(MAX_SWEEP_BATCHES):
            batch = [command for command in await self._commands.lapsed(at, SWEEP_BATCH) if command.id not in seen]
            if not batch:
                break
            for command in batch:
                seen.add(command.id)
                try:
                    _, applied = await self._change_command(command, lambda c: lapsed(c, at))
                except DomainError as error:  # one command must not hold up the others
                    log.warning("sweeping %s failed: %s", command.name, error.message)
                    continue
                changed += applied
        return changed

    async def _repair_sessions(self, at: datetime) -> int:
        changed = 0
        for session in await self._sessions.awaiting_command(at - SESSION_REPAIR_GRACE, SWEEP_BATCH):
            try:
                decide = await self._session_repair(session, at)
                if decide is not None:
                    _, applied = await self._change_session(session, decide)
                    changed += applied
            except DomainError as error:
                log.warning("repairing %s failed: %s", session.name, error.message)
        return changed

    async def _session_repair(self, session: Session, at: datetime) -> Callable[[Session], Session | None] | None:
        device_id, command_id = parse_command_name(session.current_command, "session.current_command")
        command = await self._commands.get(storage_key(device_id, command_id))
        if command is None:
            if session.update_time > at - MISSING_COMMAND_GRACE:
                return None
            expected = session.current_command
            return lambda s: session_command_missing(s, expected, at)
        if not command.is_terminal:
            return None
        return lambda s: session_outcome(s, command, at)

    # --- changes ------------------------------------------------------------------------------

    async def _change_command(
        self, command: Command, decide: Callable[[Command], Command | None], *, fresh: bool = False
    ) -> tuple[Command, bool]:
        """Applies `decide` to the latest command until it claims a revision or has nothing to do.

        `fresh`: `command` was just read (with `read`, so perhaps behind a claim not yet stored),
        and the first attempt starts from it. A claim made on a stale base loses, and a stale
        "nothing to do" is not trusted: both read again with `get`.
        Returns the command as it ends up, and whether this call changed it.
        """
        unverified: Command | None = command if fresh else None
        for _ in range(MAX_CLAIM_ATTEMPTS):
            current = unverified or await self._commands.get(command.id)
            if current is None:
                raise _command_not_found(command.name)
            changed = decide(current)
            if changed is None:
                if unverified is None:
                    await self._commands.forget_if_finished(current)
                    return current, False
            elif await self._commands.claim(changed):
                # Claimed, the change has happened (a `get` shows it from now on): those waiting
                # for it are answered at once. The writes that follow go one after the other:
                # FerretDB's SQLite takes one writer at a time, and writers that collide wait
                # (`python -m tools.ferretdb.write_concurrency`: a pair at once is the slower).
                self._watch.changed(changed)
                await self._commands.store(changed)
                await audit(
                    self._trail, changed.organization, changed.name, description=_command_change(current, changed)
                )
                if changed.is_terminal and changed.session:
                    await self._settle_session(changed)
                return changed, True
            unverified = None
        raise Aborted(
            f"command {command.name} kept changing while this request tried to change it; retry",
            reason="CONCURRENT_CHANGE",
            metadata={"command": command.name},
        )

    async def _change_session(
        self, session: Session, decide: Callable[[Session], Session | None]
    ) -> tuple[Session, bool]:
        for _ in range(MAX_CLAIM_ATTEMPTS):
            current = await self._sessions.get(session.id)
            if current is None:
                raise _session_not_found(session.name)
            changed = decide(current)
            if changed is None:
                return current, False
            if await self._sessions.claim(changed):
                await self._sessions.store(changed)
                await audit(
                    self._trail, changed.organization, changed.name, description=_session_change(current, changed)
                )
                return changed, True
        raise Aborted(
            f"session {session.name} kept changing while this request tried to change it; retry",
            reason="CONCURRENT_CHANGE",
            metadata={"session": session.name},
        )

    async def _settle_session(self, command: Command) -> None:
        """The session of a command that just ended moves on (only if that was its current command)."""
        device_id, session_id = parse_session_name(command.session, "command.session")
        session = await self._sessions.get(storage_key(device_id, session_id))
        if session is None:
            log.warning("command %s names session %s, which does not exist", command.name, command.session)
            return
        at = self._clock()
        await self._change_session(session, lambda s: session_outcome(s, command, at))

    # --- lookups and access -------------------------------------------------------------------

    async def _assignment(self, principal: Principal, device: str) -> DeviceAssignment:
        """The device's current assignment, if the caller may command the device's data organization."""
        assignment = await self._devices.assignment(device)
        if assignment is None:
            if not principal.sees_every_organization:
                raise _denied(principal, device)
            raise NotFound(f"device {device!r} does not exist", reason="DEVICE_NOT_FOUND", metadata={"device": device})
        if not principal.can_access(assignment.data_organization):
            raise _denied(principal, device)
        return assignment

    async def _require_room(self, device: str) -> None:
        """Refuses a command for a device with too many waiting; counts this one in if not."""
        at = self._clock()
        read_at, pending = self._pending_counts.get(device, (datetime.min.replace(tzinfo=UTC), 0))
        if not timedelta(0) <= at - read_at < PENDING_COUNT_PERIOD:
            read_at, pending = at, await self._commands.count_pending(device)
            if len(self._pending_counts) >= MAX_COUNTED_DEVICES:
                self._pending_counts.clear()
        if pending >= MAX_PENDING_PER_DEVICE:
            raise ResourceExhausted(
                f"{device} already has {pending} commands waiting for delivery; cancel some or wait for it to connect",
                reason="TOO_MANY_PENDING_COMMANDS",
                metadata={"device": device, "limit": str(MAX_PENDING_PER_DEVICE)},
            )
        self._pending_counts[device] = (read_at, pending + 1)

    @staticmethod
    def _scope(principal: Principal, device: str) -> list[Condition]:
        scope = [Condition("device", True, device)]
        if not principal.sees_every_organization:
            scope.append(Condition("organization", True, principal.organization))
        return scope

    async def _find_command(self, name: str) -> Command:
        """The command as the base of a change (see `_change_command`)."""
        device_id, command_id = parse_command_name(name)
        command = await self._commands.read(storage_key(device_id, command_id))
        if command is None:
            raise _command_not_found(name)
        return command

    async def _visible_command(
        self, name: str, roles: tuple[Role, ...], action: str, *, to_change: bool = False
    ) -> Command:
        """The command, if the caller may see it; `to_change`: as the base of a change (one read,
        see `_change_command`), else as it is. Its organization never changes, so either will do
        for the access check."""
        principal = current_principal()
        principal.require_role(*roles, action=action)
        device_id, command_id = parse_command_name(name)
        key = storage_key(device_id, command_id)
        command = await (self._commands.read(key) if to_change else self._commands.get(key))
        if command is None or not principal.can_access(command.organization):
            if not principal.sees_every_organization:
                raise _denied(principal, name)
            raise _command_not_found(name)
        return command

    async def _visible_session(self, name: str, roles: tuple[Role, ...], action: str) -> Session:
        principal = current_principal()
        principal.require_role(*roles, action=action)
        device_id, session_id = parse_session_name(name)
        session = await self._sessions.get(storage_key(device_id, session_id))
        if session is None or not principal.can_access(session.organization):
            if not principal.sees_every_organization:
                raise _denied(principal, name)
            raise _session_not_found(name)
        return session

    async def _notify(self, command: Command) -> None:
        try:
            await self._notifier.command_changed(command)
        except Exception:  # a hint only: the pending list delivers it anyway
            log.warning("could not notify the device of %s", command.name, exc_info=True)


def _require_internal(action: str) -> None:
    principal = current_principal()
    if not principal.is_internal:
        raise PermissionDenied(
            f"only the MQTT adapter may {action}", reason="INTERNAL_ONLY", metadata={"subject": principal.subject}
        )
