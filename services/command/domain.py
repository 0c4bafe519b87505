"""Commands and remote usage sessions: names, states and their transition tables. No I/O.

Every change of a command or a session is a pure function here that returns the changed
resource (revision + 1), or None when there is nothing to change, so a retried request, a
repeated device report or two instances sweeping the same deadline all reach the same state.
Whether a request that changed nothing is still an answer or a refusal is decided from the
state the resource ended in (`*_refusal`), after any concurrent writer had its say.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from medmesh.runtime.errors import FailedPrecondition, InvalidArgument
from medmesh.runtime.resources import etag_of

DEVICE_PREFIX = "devices/"
COMMANDS = "/commands/"
SESSIONS = "/sessions/"
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ID_PATTERN = re.compile(r"^[a-z0-9-]{1,63}$")
COMMAND_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
# Commands of this family are made by the session methods only.
SESSION_COMMAND_PREFIX = "session."
SESSION_PARAMETER = "session"  # the key of session.start's parameters that names the session

DEFAULT_TIMEOUT = timedelta(seconds=60)
DEFAULT_TTL = timedelta(hours=1)
MIN_DURATION = timedelta(seconds=1)
MAX_TIMEOUT = timedelta(days=1)
MAX_TTL = timedelta(days=7)
MAX_PARAMETERS_BYTES = 8 * 1024  # MQTT messages to devices stay small
MAX_RESULT_BYTES = 16 * 1024
MAX_ERROR_MESSAGE = 1024


class CommandState(StrEnum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"


TERMINAL_STATES = frozenset(
    {
        CommandState.COMPLETED,
        CommandState.FAILED,
        CommandState.TIMED_OUT,
        CommandState.CANCELED,
        CommandState.EXPIRED,
    }
)
# States a device may report.
REPORTABLE_STATES = frozenset({CommandState.IN_PROGRESS, CommandState.COMPLETED, CommandState.FAILED})
# Where each state may go. A device report implies delivery, so PENDING may skip DELIVERED (the
# adapter can publish a command and lose the MarkCommandDelivered call). Terminal states go nowhere.
# There is no cycle: a command enters each state at most once.
TRANSITIONS: dict[CommandState, frozenset[CommandState]] = {
    CommandState.PENDING: frozenset(
        {
            CommandState.DELIVERED,
            CommandState.IN_PROGRESS,
            CommandState.COMPLETED,
            CommandState.FAILED,
            CommandState.CANCELED,
            CommandState.EXPIRED,
        }
    ),
    CommandState.DELIVERED: frozenset(
        {
            CommandState.IN_PROGRESS,
            CommandState.COMPLETED,
            CommandState.FAILED,
            CommandState.TIMED_OUT,
            CommandState.CANCELED,
        }
    ),
    CommandState.IN_PROGRESS: frozenset({CommandState.COMPLETED, CommandState.FAILED, CommandState.TIMED_OUT}),
    **{state: frozenset() for state in TERMINAL_STATES},
}
# Why a finished command refuses what comes after it; the device logs the reason.
_OVER_REASONS = {
    CommandState.TIMED_OUT: "COMMAND_TIMED_OUT",
    CommandState.CANCELED: "COMMAND_CANCELED",
    CommandState.EXPIRED: "COMMAND_EXPIRED",
    CommandState.COMPLETED: "COMMAND_ALREADY_FINISHED",
    CommandState.FAILED: "COMMAND_ALREADY_FINISHED",
}


_last_id_time = (0, 0)  # (milliseconds, sequence) of the last id made by this process


def new_id(at: datetime) -> str:
    """12 hex digits of milliseconds, 4 of sequence, then 6 random: ids sort by creation time, as
    listings and the pending queue do, and within one process strictly in the order they were made
    (a session.stop right after its session.start must not overtake it)."""
    global _last_id_time
    millis = int(at.timestamp() * 1000)
    last_millis, sequence = _last_id_time
    if millis <= last_millis and sequence < 0xFFFF:
        millis, sequence = last_millis, sequence + 1
    else:
        sequence = 0
    _last_id_time = (millis, sequence)
    return f"{millis:012x}{sequence:04x}{secrets.token_hex(3)}"


def json_size(value: Mapping[str, Any] | None) -> int:
    if value is None:
        return 0
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def require_json_object(value: Mapping[str, Any] | None, limit: int, field: str) -> dict[str, Any]:
    size = json_size(value)
    if size > limit:
        raise InvalidArgument.for_field(field, f"is {size} bytes as JSON; at most {limit}", reason="PAYLOAD_TOO_LARGE")
    return dict(value or {})


def require_duration(
    value: timedelta | None, default: timedelta, maximum: timedelta, field: str, minimum: timedelta = MIN_DURATION
) -> timedelta:
    if value is None:
        return default
    if not minimum <= value <= maximum:
        raise InvalidArgument.for_field(field, f"must be between {minimum} and {maximum}", reason="INVALID_DURATION")
    return value


# --- names ------------------------------------------------------------------------------------


def _invalid_name(field: str, shape: str, written: str) -> InvalidArgument:
    return InvalidArgument.for_field(field, f"must look like {shape}, got {written!r}", reason="INVALID_NAME")


def parse_device(name: str, field: str = "parent") -> str:
    """`devices/{device}` -> the device id."""
    device_id = name.removeprefix(DEVICE_PREFIX)
    if name.startswith(DEVICE_PREFIX) and DEVICE_ID_PATTERN.match(device_id):
        return device_id
    raise _invalid_name(field, "devices/{device}", name)


def _parse_child(name: str, collection: str, field: str) -> tuple[str, str]:
    device, separator, child_id = name.partition(collection)
    shape = f"devices/{{device}}{collection}{{{collection.strip('/')[:-1]}}}"
    if not separator or not ID_PATTERN.match(child_id):
        raise _invalid_name(field, shape, name)
    try:
        return parse_device(device, field), child_id
    except InvalidArgument:
        raise _invalid_name(field, shape, name) from None


def parse_command_name(name: str, field: str = "name") -> tuple[str, str]:
    """`devices/{d}/commands/{c}` -> (d, c)."""
    return _parse_child(name, COMMANDS, field)


def parse_session_name(name: str, field: str = "name") -> tuple[str, str]:
    """`devices/{d}/sessions/{s}` -> (d, s)."""
    return _parse_child(name, SESSIONS, field)


def require_child_id(child_id: str, field: str) -> str:
    if child_id and not ID_PATTERN.match(child_id):
        raise InvalidArgument.for_field(field, "must match [a-z0-9-]{1,63}", reason="INVALID_ID")
    return child_id


def storage_key(device_id: str, child_id: str) -> str:
    # `/` cannot occur in either id: the key is unique, and sorts a device's children together.
    return f"{device_id}/{child_id}"


# --- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandRequest:
    """What a caller writes when creating a command."""

    command_name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    timeout: timedelta | None = None
    ttl: timedelta | None = None


@dataclass(frozen=True)
class Command:
    device_id: str
    command_id: str
    organization: str  # data organization at creation: owner for tenancy and audit
    command_name: str
    parameters: dict[str, Any]
    timeout: timedelta
    ttl: timedelta
    creator: str
    create_time: datetime
    expire_time: datetime  # create_time + ttl
    update_time: datetime
    state: CommandState = CommandState.PENDING
    session: str = ""  # devices/{d}/sessions/{s} for a session's command
    deliver_time: datetime | None = None
    start_time: datetime | None = None
    complete_time: datetime | None = None
    deadline: datetime | None = None  # deliver_time + timeout
    stop_requested: bool = False
    stop_request_time: datetime | None = None
    result: dict[str, Any] | None = None
    error_message: str = ""
    revision: int = 1

    @property
    def id(self) -> str:
        return storage_key(self.device_id, self.command_id)

    @property
    def device(self) -> str:
        return DEVICE_PREFIX + self.device_id

    @property
    def name(self) -> str:
        return self.device + COMMANDS + self.command_id

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def _moved(self, target: CommandState, at: datetime, **changes: Any) -> Command:
        if target not in TRANSITIONS[self.state]:
            raise FailedPrecondition(
                f"command {self.name} cannot go from {self.state} to {target}",
                reason=_OVER_REASONS.get(self.state, "INVALID_STATE_TRANSITION"),
                metadata={"command": self.name, "state": self.state.value, "target": target.value},
            )
        return replace(self, state=target, update_time=at, revision=self.revision + 1, **changes)

    def _delivery_implied(self, at: datetime) -> dict[str, Any]:
        if self.deliver_time is not None:
            return {}
        return {"deliver_time": at, "deadline": at + self.timeout}

    def delivered(self, at: datetime) -> Command:
        return self._moved(CommandState.DELIVERED, at, deliver_time=at, deadline=at + self.timeout)

    def started(self, at: datetime) -> Command:
        return self._moved(CommandState.IN_PROGRESS, at, start_time=at, **self._delivery_implied(at))

    def finished(self, state: CommandState, at: datetime, result: dict[str, Any] | None, error_message: str) -> Command:
        if state not in (CommandState.COMPLETED, CommandState.FAILED):
            raise ValueError(f"a device finishes a command as COMPLETED or FAILED, not {state}")
        return self._moved(
            state, at, complete_time=at, result=result, error_message=error_message, **self._delivery_implied(at)
        )

    def timed_out(self) -> Command:
        """At the deadline itself: whoever applies it, the command is the same."""
        assert self.deadline is not None
        message = f"the device did not finish within {_seconds(self.timeout)} of delivery"
        return self._moved(CommandState.TIMED_OUT, self.deadline, complete_time=self.deadline, error_message=message)

    def expired(self) -> Command:
        message = f"the device did not connect within the command's ttl of {_seconds(self.ttl)}"
        return self._moved(
            CommandState.EXPIRED, self.expire_time, complete_time=self.expire_time, error_message=message
        )

    def canceled(self, at: datetime) -> Command:
        return self._moved(CommandState.CANCELED, at, complete_time=at, error_message="canceled")

    def with_stop_request(self, at: datetime) -> Command:
        return replace(self, stop_requested=True, stop_request_time=at, update_time=at, revision=self.revision + 1)


def _seconds(duration: timedelta) -> str:
    return f"{duration.total_seconds():g}s"


def new_command(
    device_id: str,
    organization: str,
    request: CommandRequest,
    creator: str,
    at: datetime,
    *,
    command_id: str = "",
    session: str = "",
    field_prefix: str = "command",
) -> Command:
    """A validated new PENDING command; `session.*` names only for a session's commands."""
    name = request.command_name
    if not COMMAND_NAME_PATTERN.match(name):
        raise InvalidArgument.for_field(f"{field_prefix}.command_name", "must match ^[a-z][a-z0-9_.]{0,63}$")
    if name.startswith(SESSION_COMMAND_PREFIX) and not session:
        raise InvalidArgument.for_field(
            f"{field_prefix}.command_name",
            f"names starting with {SESSION_COMMAND_PREFIX!r} are reserved for sessions; use the session methods",
            reason="RESERVED_COMMAND_NAME",
        )
    ttl = require_duration(request.ttl, DEFAULT_TTL, MAX_TTL, f"{field_prefix}.ttl")
    return Command(
        device_id=device_id,
        command_id=require_child_id(command_id, "command_id") or new_id(at),
        organization=organization,
        command_name=name,
        parameters=require_json_object(request.parameters, MAX_PARAMETERS_BYTES, f"{field_prefix}.parameters"),
        timeout=require_duration(request.timeout, DEFAULT_TIMEOUT, MAX_TIMEOUT, f"{field_prefix}.timeout"),
        ttl=ttl,
        creator=creator,
        create_time=at,
        expire_time=at + ttl,
        update_time=at,
        session=session,
    )


def lapsed(command: Command, at: datetime) -> Command | None:
    """The command TIMED_OUT or EXPIRED if its deadline or expire time has passed by `at`."""
    if command.state in (CommandState.DELIVERED, CommandState.IN_PROGRESS):
        if command.deadline is not None and command.deadline <= at:
            return command.timed_out()
    elif command.state is CommandState.PENDING and command.expire_time <= at:
        return command.expired()
    return None


def _over(command: Command, doing: str) -> FailedPrecondition:
    reason = _OVER_REASONS[command.state]
    detail = f": {command.error_message}" if command.error_message else ""
    return FailedPrecondition(
        f"cannot {doing} command {command.name}: it is {command.state}{detail}",
        reason=reason,
        metadata={"command": command.name, "state": command.state.value},
    )


# Each action: change(command, at) -> changed command or None; refusal(final command) -> error or None.


def delivery_change(command: Command, at: datetime) -> Command | None:
    return command.delivered(at) if command.state is CommandState.PENDING else None


def delivery_refusal(command: Command) -> FailedPrecondition | None:
    # Delivered, running or finished by the device: the adapter's call is simply late.
    if command.state in (CommandState.TIMED_OUT, CommandState.CANCELED, CommandState.EXPIRED):
        return _over(command, "deliver")
    return None


def report_change(
    command: Command, state: CommandState, at: datetime, result: dict[str, Any] | None, error_message: str
) -> Command | None:
    if state not in REPORTABLE_STATES:
        raise InvalidArgument.for_field("state", "must be IN_PROGRESS, COMPLETED or FAILED", reason="INVALID_STATE")
    if command.is_terminal:
        return None
    if state is CommandState.IN_PROGRESS:
        return None if command.state is CommandState.IN_PROGRESS else command.started(at)
    result = require_json_object(result, MAX_RESULT_BYTES, "result") if result is not None else None
    return command.finished(state, at, result, error_message[:MAX_ERROR_MESSAGE])


def report_refusal(command: Command, state: CommandState) -> FailedPrecondition | None:
    if not command.is_terminal or command.state is state:
        return None
    if state is CommandState.IN_PROGRESS and command.state in (CommandState.COMPLETED, CommandState.FAILED):
        return None  # a late "started" after the device's own final report: nothing to say
    return _over(command, f"report {state} for")


def cancel_change(command: Command, at: datetime) -> Command | None:
    if command.state in (CommandState.PENDING, CommandState.DELIVERED):
        return command.canceled(at)
    return None


def cancel_refusal(command: Command) -> FailedPrecondition | None:
    if command.state is CommandState.CANCELED:
        return None
    if command.state is CommandState.IN_PROGRESS:
        return FailedPrecondition(
            f"command {command.name} is IN_PROGRESS: the device started it; stop it with :stop instead",
            reason="COMMAND_IN_PROGRESS",
            metadata={"command": command.name, "state": command.state.value},
        )
    return _over(command, "cancel") if command.is_terminal else None


def stop_change(command: Command, at: datetime) -> Command | None:
    if command.state is CommandState.IN_PROGRESS and not command.stop_requested:
        return command.with_stop_request(at)
    return None


def stop_refusal(command: Command) -> FailedPrecondition | None:
    if command.state is CommandState.IN_PROGRESS:
        return None
    if command.state in (CommandState.PENDING, CommandState.DELIVERED):
        return FailedPrecondition(
            f"command {command.name} is {command.state}: the device has not started it; cancel it with :cancel",
            reason="COMMAND_NOT_STARTED",
            metadata={"command": command.name, "state": command.state.value},
        )
    return _over(command, "stop")


# --- sessions ---------------------------------------------------------------------------------


class SessionState(StrEnum):
    STARTING = "STARTING"
    ACTIVE = "ACTIVE"
    PAUSING = "PAUSING"
    PAUSED = "PAUSED"
    RESUMING = "RESUMING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"


FINAL_SESSION_STATES = frozenset({SessionState.STOPPED, SessionState.FAILED})


class SessionAction(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"

    @property
    def command_name(self) -> str:
        return SESSION_COMMAND_PREFIX + self.value


START_COMMAND = SESSION_COMMAND_PREFIX + "start"


@dataclass(frozen=True)
class ActionRule:
    allowed_from: frozenset[SessionState]
    target: SessionState
    # States in which asking again changes nothing and is answered with the session as it is.
    already: frozenset[SessionState]


SESSION_ACTIONS: dict[SessionAction, ActionRule] = {
    SessionAction.PAUSE: ActionRule(
        frozenset({SessionState.ACTIVE}),
        SessionState.PAUSING,
        frozenset({SessionState.PAUSING, SessionState.PAUSED}),
    ),
    SessionAction.RESUME: ActionRule(
        frozenset({SessionState.PAUSED}),
        SessionState.RESUMING,
        frozenset({SessionState.RESUMING, SessionState.ACTIVE}),
    ),
    # Stopping does not wait for a command in flight: session.stop is queued behind it.
    SessionAction.STOP: ActionRule(
        frozenset(
            {
                SessionState.STARTING,
                SessionState.ACTIVE,
                SessionState.PAUSING,
                SessionState.PAUSED,
                SessionState.RESUMING,
            }
        ),
        SessionState.STOPPING,
        frozenset({SessionState.STOPPING, SessionState.STOPPED}),
    ),
}
# A state waiting for its command -> (state when the device completes it, state when it does not).
SESSION_OUTCOMES: dict[SessionState, tuple[SessionState, SessionState]] = {
    SessionState.STARTING: (SessionState.ACTIVE, SessionState.FAILED),
    SessionState.PAUSING: (SessionState.PAUSED, SessionState.ACTIVE),
    SessionState.RESUMING: (SessionState.ACTIVE, SessionState.PAUSED),
    SessionState.STOPPING: (SessionState.STOPPED, SessionState.FAILED),
}


@dataclass(frozen=True)
class SessionRequest:
    """What a caller writes when starting a session."""

    parameters: Mapping[str, Any] = field(default_factory=dict)
    command_timeout: timedelta | None = None
    command_ttl: timedelta | None = None


@dataclass(frozen=True)
class Session:
    device_id: str
    session_id: str
    organization: str
    patient: str  # organizations/{o}/patients/{p} or ""; an opaque name, never PHI
    creator: str
    parameters: dict[str, Any]
    command_timeout: timedelta
    command_ttl: timedelta
    state: SessionState
    current_command: str  # devices/{d}/commands/{c}
    create_time: datetime
    update_time: datetime
    error_message: str = ""
    active_time: datetime | None = None
    end_time: datetime | None = None
    revision: int = 1

    @property
    def id(self) -> str:
        return storage_key(self.device_id, self.session_id)

    @property
    def device(self) -> str:
        return DEVICE_PREFIX + self.device_id

    @property
    def name(self) -> str:
        return self.device + SESSIONS + self.session_id

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)

    @property
    def is_over(self) -> bool:
        return self.state in FINAL_SESSION_STATES

    @property
    def awaits_command(self) -> bool:
        return self.state in SESSION_OUTCOMES

    def command_request(self, command_name: str) -> CommandRequest:
        """The request of the session command `command_name`: every one names the session, and
        session.start also carries the session's parameters."""
        base = self.parameters if command_name == START_COMMAND else {}
        return CommandRequest(
            command_name, {**base, SESSION_PARAMETER: self.name}, self.command_timeout, self.command_ttl
        )


def new_session(
    device_id: str,
    organization: str,
    patient: str,
    request: SessionRequest,
    creator: str,
    at: datetime,
    *,
    session_id: str = "",
) -> Session:
    if SESSION_PARAMETER in request.parameters:
        raise InvalidArgument.for_field(
            "session.parameters", f"the key {SESSION_PARAMETER!r} is set by the service", reason="RESERVED_PARAMETER"
        )
    # Room for the session name the service adds to session.start's parameters.
    parameters = require_json_object(request.parameters, MAX_PARAMETERS_BYTES - 256, "session.parameters")
    session_id = require_child_id(session_id, "session_id") or new_id(at)
    return Session(
        device_id=device_id,
        session_id=session_id,
        organization=organization,
        patient=patient,
        creator=creator,
        parameters=parameters,
        command_timeout=require_duration(
            request.command_timeout, DEFAULT_TIMEOUT, MAX_TIMEOUT, "session.command_timeout"
        ),
        command_ttl=require_duration(request.command_ttl, DEFAULT_TTL, MAX_TTL, "session.command_ttl"),
        state=SessionState.STARTING,
        current_command=DEVICE_PREFIX + device_id + COMMANDS + new_id(at),
        create_time=at,
        update_time=at,
    )


def session_action_change(session: Session, action: SessionAction, command_id: str, at: datetime) -> Session | None:
    """The session waiting for its new command `command_id`; None when the action has nothing to do."""
    rule = SESSION_ACTIONS[action]
    if session.state not in rule.allowed_from:
        return None
    return replace(
        session,
        state=rule.target,
        current_command=session.device + COMMANDS + command_id,
        error_message="",
        update_time=at,
        revision=session.revision + 1,
    )


def session_action_refusal(session: Session, action: SessionAction) -> FailedPrecondition | None:
    rule = SESSION_ACTIONS[action]
    if session.state in rule.already:
        return None
    return FailedPrecondition(
        f"cannot {action.value} session {session.name}: it is {session.state}",
        reason=f"SESSION_{session.state.value}",
        metadata={"session": session.name, "state": session.state.value},
    )


def session_outcome(session: Session, command: Command, at: datetime) -> Session | None:
    """The session once its current command is over; None for any other command, or one still running."""
    if not session.awaits_command or command.name != session.current_command or not command.is_terminal:
        return None
    if command.state is CommandState.COMPLETED:
        return _settled(session, SESSION_OUTCOMES[session.state][0], "", at)
    detail = f": {command.error_message}" if command.error_message else ""
    return _settled(session, SESSION_OUTCOMES[session.state][1], f"{command.command_name} {command.state}{detail}", at)


def session_command_missing(session: Session, command: str, at: datetime) -> Session | None:
    """The session when its command `command` was never created (the service stopped in between)."""
    if not session.awaits_command or session.current_command != command:
        return None
    return _settled(session, SESSION_OUTCOMES[session.state][1], "the session command was never created", at)


def _settled(session: Session, state: SessionState, error_message: str, at: datetime) -> Session:
    changes: dict[str, Any] = {}
    if state is SessionState.ACTIVE and session.active_time is None:
        changes["active_time"] = at
    if state in FINAL_SESSION_STATES:
        changes["end_time"] = at
    return replace(
        session,
        state=state,
        error_message=error_message[:MAX_ERROR_MESSAGE],
        update_time=at,
        revision=session.revision + 1,
        **changes,
    )
