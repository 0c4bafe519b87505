"""The command domain: names, validation, the state tables and the pure change functions."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from medmesh.runtime.errors import FailedPrecondition, InvalidArgument
from services.command.domain import (
    MAX_PARAMETERS_BYTES,
    START_COMMAND,
    TERMINAL_STATES,
    TRANSITIONS,
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
)

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ORG = "organizations/a"
S = CommandState


def pending(**changes: object) -> Command:
    command = new_command("SN-1", ORG, CommandRequest("reboot", {"delay": 5}), "organizations/a/users/u", AT)
    return replace(command, **changes)  # type: ignore[arg-type]


def in_state(state: CommandState) -> Command:
    """A command that reached `state` the ordinary way, at AT + 1 s."""
    command = pending()
    later = AT + timedelta(seconds=1)
    if state is S.PENDING:
        return command
    if state is S.EXPIRED:
        return command.expired()
    if state is S.CANCELED:
        return command.canceled(later)
    command = command.delivered(later)
    if state is S.DELIVERED:
        return command
    if state is S.TIMED_OUT:
        return command.timed_out()
    command = command.started(later)
    if state is S.IN_PROGRESS:
        return command
    return command.finished(state, later, {"ok": state is S.COMPLETED}, "")


# --- names and validation ---------------------------------------------------------------------


def test_names_parse() -> None:
    assert parse_device("devices/SN-1.a_b") == "SN-1.a_b"
    assert parse_command_name("devices/SN-1/commands/c-1") == ("SN-1", "c-1")
    assert parse_session_name("devices/SN-1/sessions/s1") == ("SN-1", "s1")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "devices/",
        "devices/-x/commands/c",
        "devices/SN-1/commands/C1",
        "devices/SN-1/sessions/s1",
        "SN-1/commands/c",
    ],
)
def test_bad_command_names_are_invalid(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_command_name(name)
    assert caught.value.reason == "INVALID_NAME"
    assert caught.value.field_violations[0].field == "name"


def test_a_new_command_has_the_defaults() -> None:
    command = pending()

    assert command.state is S.PENDING
    assert (command.timeout, command.ttl) == (timedelta(seconds=60), timedelta(hours=1))
    assert command.expire_time == AT + timedelta(hours=1)
    assert command.deadline is None
    assert command.name == f"devices/SN-1/commands/{command.command_id}"
    assert command.revision == 1


def test_generated_ids_sort_by_time() -> None:
    assert new_id(AT) < new_id(AT + timedelta(milliseconds=1)) < new_id(AT + timedelta(days=400))


@pytest.mark.parametrize(
    ("request_", "field", "reason"),
    [
        (CommandRequest("Reboot"), "command.command_name", "INVALID_FIELD"),
        (CommandRequest("session.start"), "command.command_name", "RESERVED_COMMAND_NAME"),
        (CommandRequest("x", {"blob": "x" * MAX_PARAMETERS_BYTES}), "command.parameters", "PAYLOAD_TOO_LARGE"),
        (CommandRequest("x", timeout=timedelta(milliseconds=500)), "command.timeout", "INVALID_DURATION"),
        (CommandRequest("x", timeout=timedelta(days=1, seconds=1)), "command.timeout", "INVALID_DURATION"),
        (CommandRequest("x", ttl=timedelta(days=7, seconds=1)), "command.ttl", "INVALID_DURATION"),
    ],
)
def test_bad_command_requests(request_: CommandRequest, field: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        new_command("SN-1", ORG, request_, "u", AT)

    assert (caught.value.field_violations[0].field, caught.value.reason) == (field, reason)


def test_the_limits_themselves_are_allowed() -> None:
    request = CommandRequest("x", {}, timedelta(days=1), timedelta(days=7))

    command = new_command("SN-1", ORG, request, "u", AT)

    assert command.expire_time == AT + timedelta(days=7)


# --- the transition table ---------------------------------------------------------------------


def test_terminal_states_are_final_and_every_state_is_in_the_table() -> None:
    assert set(TRANSITIONS) == set(CommandState)
    for state in TERMINAL_STATES:
        assert TRANSITIONS[state] == frozenset()


def test_there_is_no_way_back() -> None:
    """Each state is entered at most once: what makes the (command, revision) claims enough."""
    order = list(CommandState)
    for state, targets in TRANSITIONS.items():
        assert all(order.index(target) > order.index(state) for target in targets)


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
def test_nothing_moves_a_finished_command(state: CommandState) -> None:
    command = in_state(state)
    moves = [
        lambda: command.delivered(AT),
        lambda: command.started(AT),
        lambda: command.finished(S.COMPLETED, AT, None, ""),
        lambda: command.canceled(AT),
    ]
    for move in moves:
        with pytest.raises(FailedPrecondition):
            move()


def test_delivery_starts_the_deadline() -> None:
    later = AT + timedelta(minutes=5)

    delivered = pending().delivered(later)

    assert (delivered.state, delivered.deliver_time, delivered.deadline) == (
        S.DELIVERED,
        later,
        later + timedelta(seconds=60),
    )
    assert delivered.revision == 2


def test_a_report_implies_delivery() -> None:
    later = AT + timedelta(minutes=5)

    finished = pending().finished(S.COMPLETED, later, {"uptime": 3}, "")

    assert (finished.deliver_time, finished.deadline, finished.complete_time) == (
        later,
        later + timedelta(seconds=60),
        later,
    )
    assert finished.result == {"uptime": 3}


# --- deadlines --------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [S.DELIVERED, S.IN_PROGRESS])
def test_a_command_times_out_at_its_deadline(state: CommandState) -> None:
    command = in_state(state)
    assert command.deadline is not None

    assert lapsed(command, command.deadline - timedelta(milliseconds=1)) is None
    timed_out = lapsed(command, command.deadline)

    assert timed_out is not None
    assert (timed_out.state, timed_out.complete_time) == (S.TIMED_OUT, command.deadline)
    assert "60s" in timed_out.error_message
    # Whoever applies it, whenever: the same command.
    assert lapsed(command, command.deadline + timedelta(hours=3)) == timed_out


def test_a_pending_command_expires_at_its_expire_time() -> None:
    command = pending()

    assert lapsed(command, command.expire_time - timedelta(milliseconds=1)) is None
    expired = lapsed(command, command.expire_time + timedelta(days=2))

    assert expired is not None
    assert (expired.state, expired.complete_time) == (S.EXPIRED, command.expire_time)


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
def test_finished_commands_do_not_lapse(state: CommandState) -> None:
    assert lapsed(in_state(state), AT + timedelta(days=30)) is None


# --- delivery, reports, cancel, stop ----------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "changes", "refusal"),
    [
        (S.PENDING, True, None),
        (S.DELIVERED, False, None),  # idempotent
        (S.IN_PROGRESS, False, None),
        (S.COMPLETED, False, None),  # the device was faster than the adapter's call
        (S.FAILED, False, None),
        (S.CANCELED, False, "COMMAND_CANCELED"),
        (S.EXPIRED, False, "COMMAND_EXPIRED"),
        (S.TIMED_OUT, False, "COMMAND_TIMED_OUT"),
    ],
)
def test_delivery(state: CommandState, changes: bool, refusal: str | None) -> None:
    command = in_state(state)

    assert (delivery_change(command, AT) is not None) is changes
    error = delivery_refusal(command)
    assert (error.reason if error else None) == refusal


@pytest.mark.parametrize(
    ("state", "report", "ends_in", "refusal"),
    [
        (S.PENDING, S.IN_PROGRESS, S.IN_PROGRESS, None),
        (S.DELIVERED, S.IN_PROGRESS, S.IN_PROGRESS, None),
        (S.DELIVERED, S.COMPLETED, S.COMPLETED, None),
        (S.IN_PROGRESS, S.IN_PROGRESS, S.IN_PROGRESS, None),  # repeated
        (S.IN_PROGRESS, S.FAILED, S.FAILED, None),
        (S.COMPLETED, S.COMPLETED, S.COMPLETED, None),  # repeated
        (S.COMPLETED, S.IN_PROGRESS, S.COMPLETED, None),  # late, ignored
        (S.COMPLETED, S.FAILED, S.COMPLETED, "COMMAND_ALREADY_FINISHED"),
        (S.TIMED_OUT, S.COMPLETED, S.TIMED_OUT, "COMMAND_TIMED_OUT"),
        (S.TIMED_OUT, S.IN_PROGRESS, S.TIMED_OUT, "COMMAND_TIMED_OUT"),
        (S.CANCELED, S.COMPLETED, S.CANCELED, "COMMAND_CANCELED"),
        (S.EXPIRED, S.FAILED, S.EXPIRED, "COMMAND_EXPIRED"),
    ],
)
def test_reports(state: CommandState, report: CommandState, ends_in: CommandState, refusal: str | None) -> None:
    command = in_state(state)

    changed = report_change(command, report, AT + timedelta(seconds=2), {"n": 1}, "")
    final = changed or command

    assert final.state is ends_in
    error = report_refusal(final, report)
    assert (error.reason if error else None) == refusal
    if error is not None:
        assert command.name in error.message
        assert str(state) in error.message


def test_a_device_cannot_report_pending() -> None:
    with pytest.raises(InvalidArgument):
        report_change(pending(), S.PENDING, AT, None, "")


def test_an_oversized_result_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        report_change(in_state(S.IN_PROGRESS), S.COMPLETED, AT, {"x": "y" * 20_000}, "")
    assert caught.value.reason == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize(
    ("state", "changes", "refusal"),
    [
        (S.PENDING, True, None),
        (S.DELIVERED, True, None),
        (S.CANCELED, False, None),  # idempotent
        (S.IN_PROGRESS, False, "COMMAND_IN_PROGRESS"),
        (S.COMPLETED, False, "COMMAND_ALREADY_FINISHED"),
        (S.TIMED_OUT, False, "COMMAND_TIMED_OUT"),
        (S.EXPIRED, False, "COMMAND_EXPIRED"),
    ],
)
def test_cancel(state: CommandState, changes: bool, refusal: str | None) -> None:
    command = in_state(state)

    changed = cancel_change(command, AT)

    assert (changed is not None) is changes
    error = cancel_refusal(changed or command)
    assert (error.reason if error else None) == refusal


@pytest.mark.parametrize(
    ("state", "changes", "refusal"),
    [
        (S.IN_PROGRESS, True, None),
        (S.PENDING, False, "COMMAND_NOT_STARTED"),
        (S.DELIVERED, False, "COMMAND_NOT_STARTED"),
        (S.COMPLETED, False, "COMMAND_ALREADY_FINISHED"),
        (S.CANCELED, False, "COMMAND_CANCELED"),
    ],
)
def test_stop(state: CommandState, changes: bool, refusal: str | None) -> None:
    command = in_state(state)

    changed = stop_change(command, AT)

    assert (changed is not None) is changes
    error = stop_refusal(changed or command)
    assert (error.reason if error else None) == refusal


def test_a_stop_is_a_flag_not_a_state_and_asking_twice_changes_nothing() -> None:
    stopped = stop_change(in_state(S.IN_PROGRESS), AT)

    assert stopped is not None
    assert (stopped.state, stopped.stop_requested, stopped.stop_request_time) == (S.IN_PROGRESS, True, AT)
    assert stop_change(stopped, AT + timedelta(seconds=1)) is None
    assert stop_refusal(stopped) is None


# --- sessions ---------------------------------------------------------------------------------


def a_session(state: SessionState = SessionState.STARTING) -> Session:
    session = new_session("SN-1", ORG, "organizations/a/patients/p1", SessionRequest({"mode": "x"}), "u", AT)
    return replace(session, state=state)


def test_a_new_session_waits_for_its_start_command() -> None:
    session = a_session()

    assert session.state is SessionState.STARTING
    assert session.current_command.startswith("devices/SN-1/commands/")
    request = session.command_request(START_COMMAND)
    assert request.parameters == {"mode": "x", "session": session.name}
    assert session.command_request(SessionAction.PAUSE.command_name).parameters == {"session": session.name}


def test_the_session_parameter_is_the_services() -> None:
    with pytest.raises(InvalidArgument) as caught:
        new_session("SN-1", ORG, "", SessionRequest({"session": "mine"}), "u", AT)
    assert caught.value.reason == "RESERVED_PARAMETER"


@pytest.mark.parametrize(
    ("state", "action", "target", "refusal"),
    [
        (SessionState.ACTIVE, SessionAction.PAUSE, SessionState.PAUSING, None),
        (SessionState.PAUSED, SessionAction.PAUSE, None, None),  # already
        (SessionState.STARTING, SessionAction.PAUSE, None, "SESSION_STARTING"),
        (SessionState.PAUSED, SessionAction.RESUME, SessionState.RESUMING, None),
        (SessionState.ACTIVE, SessionAction.RESUME, None, None),
        (SessionState.STOPPED, SessionAction.RESUME, None, "SESSION_STOPPED"),
        (SessionState.STARTING, SessionAction.STOP, SessionState.STOPPING, None),
        (SessionState.PAUSED, SessionAction.STOP, SessionState.STOPPING, None),
        (SessionState.STOPPING, SessionAction.STOP, None, None),
        (SessionState.STOPPED, SessionAction.STOP, None, None),
        (SessionState.FAILED, SessionAction.STOP, None, "SESSION_FAILED"),
    ],
)
def test_session_actions(
    state: SessionState, action: SessionAction, target: SessionState | None, refusal: str | None
) -> None:
    session = a_session(state)

    changed = session_action_change(session, action, "next", AT)

    assert (changed.state if changed else None) == target
    if changed is not None:
        assert changed.current_command == "devices/SN-1/commands/next"
        assert changed.revision == session.revision + 1
    else:
        error = session_action_refusal(session, action)
        assert (error.reason if error else None) == refusal


@pytest.mark.parametrize(
    ("state", "outcome", "target"),
    [
        (SessionState.STARTING, S.COMPLETED, SessionState.ACTIVE),
        (SessionState.STARTING, S.TIMED_OUT, SessionState.FAILED),
        (SessionState.STARTING, S.EXPIRED, SessionState.FAILED),
        (SessionState.PAUSING, S.COMPLETED, SessionState.PAUSED),
        (SessionState.PAUSING, S.FAILED, SessionState.ACTIVE),
        (SessionState.RESUMING, S.COMPLETED, SessionState.ACTIVE),
        (SessionState.RESUMING, S.CANCELED, SessionState.PAUSED),
        (SessionState.STOPPING, S.COMPLETED, SessionState.STOPPED),
        (SessionState.STOPPING, S.TIMED_OUT, SessionState.FAILED),
    ],
)
def test_session_outcomes(state: SessionState, outcome: CommandState, target: SessionState) -> None:
    session = a_session(state)
    command = replace(in_state(outcome), command_id=session.current_command.rsplit("/", 1)[1])

    settled = session_outcome(session, command, AT)

    assert settled is not None
    assert settled.state is target
    assert (settled.error_message == "") is (outcome is S.COMPLETED)
    assert (settled.end_time is not None) is (target in (SessionState.STOPPED, SessionState.FAILED))
    assert (settled.active_time is not None) is (target is SessionState.ACTIVE)


def test_only_the_current_finished_command_settles_a_session() -> None:
    session = a_session()
    current = replace(in_state(S.COMPLETED), command_id=session.current_command.rsplit("/", 1)[1])

    assert session_outcome(session, replace(current, command_id="other"), AT) is None
    assert session_outcome(session, replace(current, state=S.IN_PROGRESS), AT) is None
    assert session_outcome(replace(session, state=SessionState.ACTIVE), current, AT) is None


def test_a_missing_session_command_fails_the_session() -> None:
    session = a_session()

    failed = session_command_missing(session, session.current_command, AT)

    assert failed is not None
    assert (failed.state, failed.error_message) == (SessionState.FAILED, "the session command was never created")
    assert session_command_missing(session, "devices/SN-1/commands/other", AT) is None
