"""The only code that touches the command service's database.

FerretDB (the embedded default) does not make a conditional update atomic: two writers that
both read revision r and both `replace_one({_id, revision: r})` can both succeed. A unique
insert is atomic, so every change is first *claimed*: the new revision is inserted into an
append-only log under the unique key `{resource}@{revision}`, and only the writer whose insert
succeeds goes on to *store* the resource document. The loser reads again and decides anew
(usually: nothing left to do). The claim is the change: the log holds the whole new document,
so a writer that stopped between its claim and its store is rolled forward by the next `get`.
The same code is correct on MongoDB.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from medmesh.runtime.mongo import Document, create_query_index
from medmesh.runtime.resources import MongoRepository, R
from services.command.domain import Command, CommandState, Session, SessionState

_WAITING = [CommandState.DELIVERED.value, CommandState.IN_PROGRESS.value]
_OPEN = frozenset([CommandState.PENDING.value, *_WAITING])
_AWAITING_COMMAND = [
    SessionState.STARTING.value,
    SessionState.PAUSING.value,
    SessionState.RESUMING.value,
    SessionState.STOPPING.value,
]
# A claim not stored this long after it was made is taken as abandoned by its writer: the next
# `get` stores it.
ABANDONED_CLAIM = timedelta(seconds=5)
# Stop requests and cancellations listed for one device at most; both end by their deadline.
MAX_SIGNALS = 500


def _is_open(document: Document) -> bool:
    """Whether the platform still has to act on this command (see CommandRepository)."""
    state = document["state"]
    if state == CommandState.CANCELED.value:
        return document.get("deadline") is not None
    return state in _OPEN


def revision_key(resource_id: str, revision: int) -> str:
    return f"{resource_id}@{revision}"


def _json(value: dict[str, Any] | None) -> str | None:
    # JSON text, not a sub-document: device-defined keys may hold `.` or `$`, which MongoDB
    # (and FerretDB) treat specially in field names.
    return None if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _from_json(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


def _millis(duration: timedelta) -> int:
    return round(duration.total_seconds() * 1000)


class RevisionedRepository(MongoRepository[R]):
    """A MongoRepository whose changes go through `claim`; `get` rolls unfinished claims forward."""

    revisions_name: str

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        super().__init__(database)
        self._revisions = database[self.revisions_name]

    async def get(self, resource_id: str) -> R | None:
        """The resource as it is: the stored document, rolled forward over any claim not yet stored.

        A claim is normally stored by its claimant a moment later, so the reader only stores
        those left ABANDONED_CLAIM or longer (their writer stopped): readers do not race the
        claimant to write the same document.
        """
        document = await self._collection.find_one({"_id": resource_id})
        if document is None:
            return None
        while True:
            newer = await self._revisions.find_one({"_id": revision_key(resource_id, document["revision"] + 1)})
            if newer is None:
                return self.from_document(document)
            document = newer["document"]
            claimed = newer.get("claim_time")
            if claimed is None or claimed <= datetime.now(UTC) - ABANDONED_CLAIM:
                await self._write(document)

    async def read(self, resource_id: str) -> R | None:
        """The stored document alone: one read, but possibly behind a claim not yet stored.

        Good as the base of a change: a change decided on a stale base claims a revision that
        is taken, loses, and the writer reads again with `get`.
        """
        document = await self._collection.find_one({"_id": resource_id})
        return None if document is None else self.from_document(document)

    async def claim(self, resource: R) -> bool:
        """Records `resource` (at its new revision) if nobody else claimed that revision; False if
        someone did. From a successful claim on, `resource` is the current state (`get` shows
        it); the claimant then writes it out with `store`."""
        try:
            await self._revisions.insert_one(
                {
                    "_id": revision_key(resource.id, resource.revision),
                    "resource": resource.id,
                    "revision": resource.revision,
                    "document": self.to_document(resource),
                    "claim_time": datetime.now(UTC),
                }
            )
        except DuplicateKeyError:
            return False
        return True

    async def store(self, resource: R) -> None:
        """Writes a claimed `resource` out, unless a newer revision is stored already."""
        await self._write(self.to_document(resource))

    async def _write(self, document: Document) -> bool:
        """Writes `document` unless a newer revision is stored; True if it wrote.

        Forward only: a slow writer must not put an older revision back over a newer one. The
        check is a read by `_id`, then a replace by `_id`, rather than one replace filtered on
        `{_id, revision: {$lt: r}}`: FerretDB pushes only an exact `_id` filter down to SQLite
        and answers any other by reading every document of the collection. Neither form is atomic
        there, and the log makes that safe: a stale write that slips in between is rolled
        forward by the next `get`.
        """
        stored = await self._collection.find_one({"_id": document["_id"]}, {"revision": 1})
        if stored is None or stored["revision"] >= document["revision"]:
            return False
        await self._collection.replace_one({"_id": document["_id"]}, document)
        return True


class CommandRepository(RevisionedRepository[Command]):
    """Commands, with a working copy of the open ones.

    `commands` holds every command, and serves reads by name and listings. `open_commands`
    holds a copy of each command the platform still has to act on: PENDING, DELIVERED or
    IN_PROGRESS, and CANCELED after delivery until its deadline (the device is told to cancel
    it). What is pending for a device, what the sweeper times out and expires, and how many
    wait are all answered from this small copy. On MongoDB the indexes would do without it; on
    FerretDB, which scans a collection for any query but by `_id`, `commands` grows with every
    command ever sent while `open_commands` stays as small as the work in hand.

    The copy follows every write of a command (`insert`, `_write`). A stale copy left by a
    writer that lost a race is dropped when the command is next acted on and turns out finished
    (`forget_if_finished`).
    """

    collection_name = "commands"
    revisions_name = "command_revisions"
    open_collection_name = "open_commands"
    resource_label = "command"

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        super().__init__(database)
        self._open = database[self.open_collection_name]

    async def ensure_indexes(self) -> None:
        # Listing: a device's commands in `_id` order (optionally one organization's).
        await create_query_index(self._collection, [("device", 1), ("_id", 1)])
        # What a device is to be told, oldest first.
        await create_query_index(self._open, [("device", 1), ("state", 1), ("create_time", 1)])
        # The sweeper: commands whose deadline or expire time has passed.
        await create_query_index(self._open, [("state", 1), ("deadline", 1)])
        await create_query_index(self._open, [("state", 1), ("expire_time", 1)])

    async def insert(self, resource: Command) -> None:
        await super().insert(resource)
        await self._copy(self.to_document(resource))

    async def _write(self, document: Document) -> bool:
        if not await super()._write(document):
            return False
        await self._copy(document)
        return True

    async def _copy(self, document: Document) -> None:
        if _is_open(document):
            await self._open.replace_one({"_id": document["_id"]}, document, upsert=True)
        else:
            await self._open.delete_one({"_id": document["_id"]})

    async def forget_if_finished(self, command: Command) -> None:
        """Drops the open copy of a finished command, which a writer that lost a race may have left."""
        if not _is_open(self.to_document(command)):
            await self._open.delete_one({"_id": command.id})

    async def pending(self, device: str, at: datetime, limit: int) -> list[Command]:
        query = {"device": device, "state": CommandState.PENDING.value, "expire_time": {"$gt": at}}
        return await self._find(query, [("create_time", 1), ("_id", 1)], limit)

    async def count_pending(self, device: str) -> int:
        return await self._open.count_documents({"device": device, "state": CommandState.PENDING.value})

    async def stop_requests(self, device: str) -> list[Command]:
        query = {"device": device, "state": CommandState.IN_PROGRESS.value, "stop_requested": True}
        return await self._find(query, [("_id", 1)], MAX_SIGNALS)

    async def cancellations(self, device: str, at: datetime) -> list[Command]:
        # Canceled while still PENDING: never delivered, no deadline, nothing to tell the device.
        query = {"device": device, "state": CommandState.CANCELED.value, "deadline": {"$gt": at}}
        return await self._find(query, [("_id", 1)], MAX_SIGNALS)

    async def lapsed(self, at: datetime, limit: int) -> list[Command]:
        """Delivered or running past their deadline, and pending past their expire time: the sweeper's work."""
        overdue = await self._find({"state": {"$in": _WAITING}, "deadline": {"$lte": at}}, [("deadline", 1)], limit)
        expired = await self._find(
            {"state": CommandState.PENDING.value, "expire_time": {"$lte": at}}, [("expire_time", 1)], limit
        )
        return overdue + expired

    async def forget_cancellations(self, at: datetime) -> None:
        """Cancellations whose deadline passed: the device no longer needs telling."""
        await self._open.delete_many({"state": CommandState.CANCELED.value, "deadline": {"$lte": at}})

    async def _find(self, query: dict[str, Any], sort: list[tuple[str, int]], limit: int) -> list[Command]:
        cursor = self._open.find(query).sort(sort).limit(limit)
        return [self.from_document(document) async for document in cursor]

    def to_document(self, resource: Command) -> Document:
        return {
            "_id": resource.id,
            "device": resource.device,
            "command_id": resource.command_id,
            "organization": resource.organization,
            "command_name": resource.command_name,
            "parameters": _json(resource.parameters),
            "timeout_ms": _millis(resource.timeout),
            "ttl_ms": _millis(resource.ttl),
            "creator": resource.creator,
            "create_time": resource.create_time,
            "expire_time": resource.expire_time,
            "update_time": resource.update_time,
            "state": resource.state.value,
            "session": resource.session,
            "deliver_time": resource.deliver_time,
            "start_time": resource.start_time,
            "complete_time": resource.complete_time,
            "deadline": resource.deadline,
            "stop_requested": resource.stop_requested,
            "stop_request_time": resource.stop_request_time,
            "result": _json(resource.result),
            "error_message": resource.error_message,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> Command:
        return Command(
            device_id=document["device"].removeprefix("devices/"),
            command_id=document["command_id"],
            organization=document["organization"],
            command_name=document["command_name"],
            parameters=_from_json(document.get("parameters")) or {},
            timeout=timedelta(milliseconds=document["timeout_ms"]),
            ttl=timedelta(milliseconds=document["ttl_ms"]),
            creator=document.get("creator", ""),
            create_time=document["create_time"],
            expire_time=document["expire_time"],
            update_time=document["update_time"],
            state=CommandState(document["state"]),
            session=document.get("session", ""),
            deliver_time=document.get("deliver_time"),
            start_time=document.get("start_time"),
            complete_time=document.get("complete_time"),
            deadline=document.get("deadline"),
            stop_requested=bool(document.get("stop_requested", False)),
            stop_request_time=document.get("stop_request_time"),
            result=_from_json(document.get("result")),
            error_message=document.get("error_message", ""),
            revision=document["revision"],
        )


class SessionRepository(RevisionedRepository[Session]):
    collection_name = "sessions"
    revisions_name = "session_revisions"
    resource_label = "session"

    async def ensure_indexes(self) -> None:
        await create_query_index(self._collection, [("device", 1), ("_id", 1)])
        # The sweeper's repair pass: sessions waiting for a command, oldest change first.
        await create_query_index(self._collection, [("state", 1), ("update_time", 1)])

    async def awaiting_command(self, changed_before: datetime, limit: int) -> list[Session]:
        """Sessions waiting for a session command, unchanged since `changed_before`."""
        query = {"state": {"$in": _AWAITING_COMMAND}, "update_time": {"$lte": changed_before}}
        cursor = self._collection.find(query).sort([("update_time", 1)]).limit(limit)
        return [self.from_document(document) async for document in cursor]

    def to_document(self, resource: Session) -> Document:
        return {
            "_id": resource.id,
            "device": resource.device,
            "session_id": resource.session_id,
            "organization": resource.organization,
            "patient": resource.patient,
            "creator": resource.creator,
            "parameters": _json(resource.parameters),
            "command_timeout_ms": _millis(resource.command_timeout),
            "command_ttl_ms": _millis(resource.command_ttl),
            "state": resource.state.value,
            "current_command": resource.current_command,
            "error_message": resource.error_message,
            "create_time": resource.create_time,
            "update_time": resource.update_time,
            "active_time": resource.active_time,
            "end_time": resource.end_time,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> Session:
        return Session(
            device_id=document["device"].removeprefix("devices/"),
            session_id=document["session_id"],
            organization=document["organization"],
            patient=document.get("patient", ""),
            creator=document.get("creator", ""),
            parameters=_from_json(document.get("parameters")) or {},
            command_timeout=timedelta(milliseconds=document["command_timeout_ms"]),
            command_ttl=timedelta(milliseconds=document["command_ttl_ms"]),
            state=SessionState(document["state"]),
            current_command=document["current_command"],
            error_message=document.get("error_message", ""),
            create_time=document["create_time"],
            update_time=document["update_time"],
            active_time=document.get("active_time"),
            end_time=document.get("end_time"),
            revision=document["revision"],
        )
