"""The only code that touches the command service's database.

FerretDB (the embedded default) does not make a conditional update atomic: two writers that
both read revision r and both `replace_one({_id, revision: r})` can both succeed. A unique
insert is atomic, so every change is first *claimed*: the new revision is inserted into an
append-only log under the unique key `{resource}@{revision}`, and only the writer whose insert
succeeds writes the resource document. The loser reads again and decides anew (usually: nothing
left to do). The log holds the whole new document, so a writer that stopped between its claim
and its write is rolled forward by the next read (`get`). The same code is correct on MongoDB.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from medmesh.runtime.mongo import Document, create_query_index
from medmesh.runtime.resources import MongoRepository, R
from services.command.domain import Command, CommandState, Session, SessionState

_WAITING = [CommandState.DELIVERED.value, CommandState.IN_PROGRESS.value]
_AWAITING_COMMAND = [
    SessionState.STARTING.value,
    SessionState.PAUSING.value,
    SessionState.RESUMING.value,
    SessionState.STOPPING.value,
]
# Stop requests and cancellations listed for one device at most; both end by their deadline.
MAX_SIGNALS = 500


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
        document = await self._collection.find_one({"_id": resource_id})
        if document is None:
            return None
        while True:
            newer = await self._revisions.find_one({"_id": revision_key(resource_id, document["revision"] + 1)})
            if newer is None:
                return self.from_document(document)
            document = newer["document"]
            await self._write(document)

    async def claim(self, resource: R) -> bool:
        """Records `resource` (at its new revision) if nobody else claimed that revision; False if someone did."""
        document = self.to_document(resource)
        try:
            await self._revisions.insert_one(
                {
                    "_id": revision_key(resource.id, resource.revision),
                    "resource": resource.id,
                    "revision": resource.revision,
                    "document": document,
                }
            )
        except DuplicateKeyError:
            return False
        await self._write(document)
        return True

    async def _write(self, document: Document) -> None:
        # Forward only: a slow writer must not put an older revision back over a newer one.
        await self._collection.replace_one(
            {"_id": document["_id"], "revision": {"$lt": document["revision"]}}, document
        )


class CommandRepository(RevisionedRepository[Command]):
    collection_name = "commands"
    revisions_name = "command_revisions"
    resource_label = "command"

    async def ensure_indexes(self) -> None:
        # Listing: a device's commands in `_id` order (optionally one organization's).
        await create_query_index(self._collection, [("device", 1), ("_id", 1)])
        # What a device is to be told, oldest first.
        await create_query_index(self._collection, [("device", 1), ("state", 1), ("create_time", 1)])
        # The sweeper: commands whose deadline or expire time has passed.
        await create_query_index(self._collection, [("state", 1), ("deadline", 1)])
        await create_query_index(self._collection, [("state", 1), ("expire_time", 1)])

    async def pending(self, device: str, at: datetime, limit: int) -> list[Command]:
        query = {"device": device, "state": CommandState.PENDING.value, "expire_time": {"$gt": at}}
        return await self._find(query, [("create_time", 1), ("_id", 1)], limit)

    async def count_pending(self, device: str) -> int:
        return await self._collection.count_documents({"device": device, "state": CommandState.PENDING.value})

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

    async def _find(self, query: dict[str, Any], sort: list[tuple[str, int]], limit: int) -> list[Command]:
        cursor = self._collection.find(query).sort(sort).limit(limit)
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
