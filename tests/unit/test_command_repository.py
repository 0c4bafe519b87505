"""The command repositories: document mapping, and revision claims against a collection fake.

The fake collection does what FerretDB does for the operations used here, all naming one `_id`:
a duplicate insert fails (atomic), a replace or delete matches or not. The real round trip runs in
tests/integration/test_command_deadlines.py.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pymongo.errors import DuplicateKeyError

from services.command.domain import (
    Command,
    CommandRequest,
    CommandState,
    Session,
    SessionState,
    new_command,
)
from services.command.repository import ABANDONED_CLAIM, CommandRepository, SessionRepository, revision_key

AT = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
COMMAND = new_command(
    "SN-1.x_y",
    "organizations/a",
    CommandRequest("reboot", {"delay": 5, "a.b": {"$c": [1, "x", None]}}, timedelta(seconds=30), timedelta(hours=2)),
    "organizations/a/users/u",
    AT,
    command_id="c-1",
)
SESSION = Session(
    device_id="SN-1",
    session_id="s1",
    organization="organizations/a",
    patient="organizations/a/patients/p1",
    creator="organizations/a/users/u",
    parameters={"mode": "therapy"},
    command_timeout=timedelta(seconds=45),
    command_ttl=timedelta(minutes=10),
    state=SessionState.ACTIVE,
    current_command="devices/SN-1/commands/c-1",
    create_time=AT,
    update_time=AT,
    error_message="",
    active_time=AT,
    revision=3,
)


def _by_id(query: dict[str, Any]) -> str:
    """The `_id` a query names: FerretDB (as built, see tools/ferretdb/README.md) reads that one
    row by the `_id` index for a filter of `_id` alone, and reads every row for any other."""
    key = query.get("_id")
    assert set(query) == {"_id"}, f"{query}: FerretDB scans the collection for this"
    assert isinstance(key, str)
    return key


def _matches(document: dict[str, Any], query: dict[str, Any]) -> bool:
    for field, wanted in query.items():
        value = document.get(field)
        if isinstance(wanted, dict):
            assert set(wanted) == {"$lt"}, f"the fake knows only $lt, not {wanted}"
            if not (value is not None and value < wanted["$lt"]):
                return False
        elif value != wanted:
            return False
    return True


class FakeCollection:
    def __init__(self) -> None:
        self.documents: dict[str, dict[str, Any]] = {}

    def _match(self, query: dict[str, Any]) -> dict[str, Any] | None:
        document = self.documents.get(_by_id(query))
        return document if document is not None and _matches(document, query) else None

    async def find_one(self, query: dict[str, Any], projection: Any = None) -> dict[str, Any] | None:
        document = self._match(query)
        return None if document is None else dict(document)

    async def insert_one(self, document: dict[str, Any]) -> None:
        if document["_id"] in self.documents:
            raise DuplicateKeyError("E11000 duplicate key")
        self.documents[document["_id"]] = dict(document)

    async def replace_one(self, query: dict[str, Any], document: dict[str, Any], upsert: bool = False) -> Any:
        matched = self._match(query) is not None
        if matched or upsert:
            self.documents[_by_id(query)] = dict(document)
        return SimpleNamespace(matched_count=int(matched))

    async def delete_one(self, query: dict[str, Any]) -> Any:
        matched = self._match(query) is not None
        if matched:
            del self.documents[_by_id(query)]
        return SimpleNamespace(deleted_count=int(matched))


@pytest.fixture
def database() -> dict[str, FakeCollection]:
    names = ("commands", "command_revisions", "open_commands", "sessions", "session_revisions")
    return {name: FakeCollection() for name in names}


@pytest.fixture
def commands(database: dict[str, FakeCollection]) -> CommandRepository:
    return CommandRepository(cast(Any, database))


def test_command_document_shape(commands: CommandRepository) -> None:
    document = commands.to_document(COMMAND)

    assert document["_id"] == "SN-1.x_y/c-1"
    assert (document["device"], document["command_id"], document["state"]) == ("devices/SN-1.x_y", "c-1", "PENDING")
    assert (document["timeout_ms"], document["ttl_ms"]) == (30_000, 7_200_000)
    # Device-defined keys such as `a.b` and `$c` are kept as JSON text, never as field names.
    assert document["parameters"] == '{"delay":5,"a.b":{"$c":[1,"x",null]}}'
    assert document["result"] is None
    assert (document["deadline"], document["expire_time"]) == (None, AT + timedelta(hours=2))


@pytest.mark.parametrize(
    "command",
    [
        COMMAND,
        COMMAND.delivered(AT).started(AT).with_stop_request(AT),
        COMMAND.delivered(AT).finished(CommandState.FAILED, AT, {"code": 7}, "jammed"),
        replace(COMMAND.canceled(AT), session="devices/SN-1.x_y/sessions/s1"),
    ],
)
def test_command_round_trip(commands: CommandRepository, command: Any) -> None:
    assert commands.from_document(commands.to_document(command)) == command


def test_session_round_trip(database: dict[str, FakeCollection]) -> None:
    sessions = SessionRepository(cast(Any, database))

    assert sessions.from_document(sessions.to_document(SESSION)) == SESSION
    assert sessions.to_document(SESSION)["command_timeout_ms"] == 45_000


async def _change(commands: CommandRepository, command: Command) -> None:
    assert await commands.claim(command)
    await commands.store(command)


async def test_a_claim_is_the_change_and_store_writes_it_out(
    commands: CommandRepository, database: dict[str, FakeCollection]
) -> None:
    await commands.insert(COMMAND)

    assert await commands.claim(COMMAND.delivered(AT))

    assert set(database["command_revisions"].documents) == {revision_key(COMMAND.id, 2)}
    assert await commands.read(COMMAND.id) == COMMAND  # the stored document, one claim behind
    await commands.store(COMMAND.delivered(AT))
    assert await commands.read(COMMAND.id) == COMMAND.delivered(AT)
    assert await commands.get(COMMAND.id) == COMMAND.delivered(AT)


async def test_a_revision_is_claimed_once(commands: CommandRepository) -> None:
    await commands.insert(COMMAND)
    await commands.claim(COMMAND.delivered(AT))

    lost = await commands.claim(COMMAND.canceled(AT))

    assert lost is False
    stored = await commands.get(COMMAND.id)
    assert stored is not None
    assert stored.state is CommandState.DELIVERED


async def test_get_rolls_forward_claims_whose_write_never_happened(
    commands: CommandRepository, database: dict[str, FakeCollection]
) -> None:
    await commands.insert(COMMAND)
    delivered = COMMAND.delivered(AT)
    started = delivered.started(AT)
    for command in (delivered, started):  # claimed by a writer that stopped before writing
        await database["command_revisions"].insert_one(
            {
                "_id": revision_key(command.id, command.revision),
                "resource": command.id,
                "revision": command.revision,
                "document": commands.to_document(command),
            }
        )

    assert await commands.get(COMMAND.id) == started
    assert database["commands"].documents[COMMAND.id]["state"] == "IN_PROGRESS"


async def test_get_shows_a_fresh_claim_but_leaves_storing_it_to_its_claimant(
    commands: CommandRepository, database: dict[str, FakeCollection]
) -> None:
    await commands.insert(COMMAND)
    assert await commands.claim(COMMAND.delivered(AT))

    assert await commands.get(COMMAND.id) == COMMAND.delivered(AT)
    assert database["commands"].documents[COMMAND.id]["state"] == "PENDING"

    # Not stored after ABANDONED_CLAIM: its writer stopped, and the reader stores it.
    claim = database["command_revisions"].documents[revision_key(COMMAND.id, 2)]
    claim["claim_time"] -= ABANDONED_CLAIM
    assert await commands.get(COMMAND.id) == COMMAND.delivered(AT)
    assert database["commands"].documents[COMMAND.id]["state"] == "DELIVERED"


async def test_a_late_write_does_not_go_back(commands: CommandRepository, database: dict[str, FakeCollection]) -> None:
    started = COMMAND.delivered(AT).started(AT)
    await database["commands"].insert_one(commands.to_document(started))

    await commands._write(commands.to_document(COMMAND.delivered(AT)))

    assert database["commands"].documents[COMMAND.id]["revision"] == 3


async def test_get_of_nothing(commands: CommandRepository) -> None:
    assert await commands.get("SN-1/none") is None


async def test_the_open_copy_follows_a_command_until_it_ends(
    commands: CommandRepository, database: dict[str, FakeCollection]
) -> None:
    open_copy = database["open_commands"].documents
    await commands.insert(COMMAND)
    assert open_copy[COMMAND.id]["state"] == "PENDING"

    delivered = COMMAND.delivered(AT)
    await _change(commands, delivered)
    assert open_copy[COMMAND.id]["state"] == "DELIVERED"

    await _change(commands, delivered.finished(CommandState.COMPLETED, AT, {"ok": True}, ""))
    assert COMMAND.id not in open_copy


async def test_a_command_canceled_after_delivery_stays_open_until_its_deadline(
    commands: CommandRepository, database: dict[str, FakeCollection]
) -> None:
    await commands.insert(COMMAND)
    delivered = COMMAND.delivered(AT)
    await _change(commands, delivered)
    await _change(commands, delivered.canceled(AT))

    assert database["open_commands"].documents[COMMAND.id]["state"] == "CANCELED"


async def test_a_command_canceled_while_pending_leaves_nothing_open(
    commands: CommandRepository, database: dict[str, FakeCollection]
) -> None:
    await commands.insert(COMMAND)
    await _change(commands, COMMAND.canceled(AT))

    assert database["open_commands"].documents == {}


async def test_a_roll_forward_updates_the_open_copy(
    commands: CommandRepository, database: dict[str, FakeCollection]
) -> None:
    await commands.insert(COMMAND)
    delivered = COMMAND.delivered(AT)
    await database["command_revisions"].insert_one(
        {"_id": revision_key(COMMAND.id, 2), "revision": 2, "document": commands.to_document(delivered)}
    )

    await commands.get(COMMAND.id)

    assert database["open_commands"].documents[COMMAND.id]["state"] == "DELIVERED"


async def test_a_stale_open_copy_of_a_finished_command_is_dropped(
    commands: CommandRepository, database: dict[str, FakeCollection]
) -> None:
    finished = COMMAND.delivered(AT).finished(CommandState.COMPLETED, AT, None, "")
    await commands.insert(finished)
    # A writer that lost a race put an older, open revision back into the copy.
    await database["open_commands"].insert_one(commands.to_document(COMMAND))

    await commands.forget_if_finished(finished)

    assert database["open_commands"].documents == {}
