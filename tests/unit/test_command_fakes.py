"""In-memory fakes of the command service's ports, and tests that they keep the repository's promises.

The stores behave like services.command.repository: a change is first claimed under the unique
key (resource, revision) and only the claimant stores the document; `get` rolls forward a claim
whose store never happened, `read` does not. Hooks let a test play a concurrent writer or a crash in between.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from medmesh.runtime.directories import DeviceAssignment
from medmesh.runtime.errors import Unavailable
from medmesh.runtime.resources import R
from services.command.domain import (
    Command,
    CommandRequest,
    CommandState,
    Session,
    SessionState,
    new_command,
)
from services.command.repository import MAX_SIGNALS
from tests.unit.fakes import InMemoryRepository

ClaimHook = Callable[[R], Awaitable[None]]


class InMemoryRevisionedStore(InMemoryRepository[R]):
    def __init__(self, resource_label: str) -> None:
        super().__init__(resource_label)
        self.claims: dict[tuple[str, int], R] = {}
        # Runs once, just before the next claim: a concurrent writer getting there first.
        self.before_next_claim: ClaimHook[R] | None = None
        # False plays a writer that stops between its claim and its document write.
        self.write_claimed = True
        self.reads = 0  # calls to get and read

    async def get(self, resource_id: str) -> R | None:
        self.reads += 1
        current = self.items.get(resource_id)
        while current is not None and (resource_id, current.revision + 1) in self.claims:
            current = self.claims[(resource_id, current.revision + 1)]
            self.items[resource_id] = current
        return current

    async def read(self, resource_id: str) -> R | None:
        self.reads += 1
        return self.items.get(resource_id)

    async def claim(self, resource: R) -> bool:
        hook, self.before_next_claim = self.before_next_claim, None
        if hook is not None:
            await hook(resource)
        key = (resource.id, resource.revision)
        if key in self.claims:
            return False
        self.claims[key] = resource
        return True

    async def store(self, resource: R) -> None:
        current = self.items.get(resource.id)
        if self.write_claimed and (current is None or current.revision < resource.revision):
            self.items[resource.id] = resource


class InMemoryCommandStore(InMemoryRevisionedStore[Command]):
    def __init__(self) -> None:
        super().__init__("command")

    def _all(self) -> list[Command]:
        return [item for _, item in sorted(self.items.items())]

    async def pending(self, device: str, at: datetime, limit: int) -> list[Command]:
        found = [
            c for c in self._all() if c.device == device and c.state is CommandState.PENDING and c.expire_time > at
        ]
        return sorted(found, key=lambda c: (c.create_time, c.id))[:limit]

    async def count_pending(self, device: str) -> int:
        return sum(1 for c in self._all() if c.device == device and c.state is CommandState.PENDING)

    async def stop_requests(self, device: str) -> list[Command]:
        return [
            c for c in self._all() if c.device == device and c.state is CommandState.IN_PROGRESS and c.stop_requested
        ][:MAX_SIGNALS]

    async def cancellations(self, device: str, at: datetime) -> list[Command]:
        return [
            c
            for c in self._all()
            if c.device == device and c.state is CommandState.CANCELED and c.deadline is not None and c.deadline > at
        ][:MAX_SIGNALS]

    async def lapsed(self, at: datetime, limit: int) -> list[Command]:
        waiting = (CommandState.DELIVERED, CommandState.IN_PROGRESS)
        overdue = [c for c in self._all() if c.state in waiting and c.deadline is not None and c.deadline <= at]
        expired = [c for c in self._all() if c.state is CommandState.PENDING and c.expire_time <= at]
        return (
            sorted(overdue, key=lambda c: c.deadline or at)[:limit]
            + sorted(expired, key=lambda c: c.expire_time)[:limit]
        )

    async def forget_cancellations(self, at: datetime) -> None:
        """Nothing to do: this store answers from every command, not from a copy of the open ones."""

    async def forget_if_finished(self, command: Command) -> None:
        """As forget_cancellations."""


class InMemorySessionStore(InMemoryRevisionedStore[Session]):
    def __init__(self) -> None:
        super().__init__("session")

    async def awaiting_command(self, changed_before: datetime, limit: int) -> list[Session]:
        found = [s for s in self.items.values() if s.awaits_command and s.update_time <= changed_before]
        return sorted(found, key=lambda s: s.update_time)[:limit]


class FakeDeviceDirectory:
    def __init__(self, assignments: Iterable[DeviceAssignment] = (), *, unavailable: bool = False) -> None:
        self.assignments = {a.device: a for a in assignments}
        self.unavailable = unavailable
        self.asked: list[str] = []

    async def assignment(self, device: str) -> DeviceAssignment | None:
        self.asked.append(device)
        if self.unavailable:
            raise Unavailable(f"cannot look up device {device!r}: UNAVAILABLE", reason="DEVICE_SERVICE_UNAVAILABLE")
        return self.assignments.get(device)


class RecordingNotifier:
    def __init__(self, *, failing: bool = False) -> None:
        self.notified: list[Command] = []
        self.failing = failing

    async def command_changed(self, command: Command) -> None:
        self.notified.append(command)
        if self.failing:
            raise ConnectionError("the adapter is gone")


class Clock:
    """A settable `now()`: tests move time instead of waiting for it."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> datetime:
        self.at += timedelta(seconds=seconds)
        return self.at


# --- the fakes keep the repository's promises -------------------------------------------------

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def a_command(command_id: str = "c1", **changes: object) -> Command:
    command = new_command("SN-1", "organizations/a", CommandRequest("reboot"), "someone", AT, command_id=command_id)
    return replace(command, **changes)  # type: ignore[arg-type]


async def test_only_one_writer_claims_a_revision() -> None:
    store = InMemoryCommandStore()
    command = a_command()
    await store.insert(command)

    first = await store.claim(command.delivered(AT))
    second = await store.claim(command.canceled(AT))

    assert (first, second) == (True, False)
    stored = await store.get(command.id)
    assert stored is not None
    assert stored.state is CommandState.DELIVERED


async def test_a_claim_not_yet_stored_is_rolled_forward_by_get_but_not_by_read() -> None:
    store = InMemoryCommandStore()
    command = a_command()
    await store.insert(command)

    assert await store.claim(command.delivered(AT))

    assert await store.read(command.id) == command
    stored = await store.get(command.id)
    assert stored is not None
    assert (stored.state, stored.revision) == (CommandState.DELIVERED, 2)
    assert store.items[command.id].revision == 2


async def test_a_late_store_never_puts_an_older_revision_back() -> None:
    store = InMemoryCommandStore()
    command = a_command()
    delivered = command.delivered(AT)
    await store.insert(command)
    store.put(delivered.started(AT))  # revision 3 already written by someone else

    assert await store.claim(delivered)
    await store.store(delivered)

    assert store.items[command.id].state is CommandState.IN_PROGRESS


@pytest.mark.parametrize(
    ("command", "listed"),
    [
        (a_command(), True),
        (a_command(expire_time=AT), False),  # expired at this very moment
        (a_command().delivered(AT), False),
    ],
)
async def test_pending_lists_undelivered_unexpired_commands(command: Command, listed: bool) -> None:
    store = InMemoryCommandStore()
    store.put(command)

    assert (await store.pending("devices/SN-1", AT, 10) == [command]) is listed


async def test_sessions_awaiting_a_command() -> None:
    store = InMemorySessionStore()
    session = Session(
        device_id="SN-1",
        session_id="s1",
        organization="organizations/a",
        patient="",
        creator="someone",
        parameters={},
        command_timeout=timedelta(seconds=60),
        command_ttl=timedelta(hours=1),
        state=SessionState.STARTING,
        current_command="devices/SN-1/commands/c1",
        create_time=AT,
        update_time=AT,
    )
    store.put(session)
    store.put(replace(session, session_id="s2", state=SessionState.ACTIVE))

    assert await store.awaiting_command(AT, 10) == [session]
    assert await store.awaiting_command(AT - timedelta(seconds=1), 10) == []
