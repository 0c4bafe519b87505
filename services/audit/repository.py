"""The only code that touches the audit service's database. Append-only: events are inserted and
read, never replaced or deleted, so this repository has no method that could."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from medmesh.runtime.audit_outbox import event_from_document, event_to_document
from medmesh.runtime.filtering import Condition, mongo_query
from medmesh.runtime.mongo import Document, create_query_index
from services.audit.domain import AuditEvent

DUPLICATE_KEY = 11000


@dataclass(frozen=True)
class InsertResult:
    stored: int
    duplicates: int


class AuditEventRepository:
    collection_name = "audit_events"

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._collection = database[self.collection_name]

    async def ensure_indexes(self) -> None:
        # Every list is newest first (`_id` descending) within an organization, optionally narrowed
        # to one resource (who touched this patient?) or one actor (what did this user do?).
        # Platform-wide lists (`organizations/-`) use the `_id` index itself.
        await create_query_index(self._collection, [("organization", 1), ("_id", 1)])
        await create_query_index(self._collection, [("organization", 1), ("resource", 1), ("_id", 1)])
        await create_query_index(self._collection, [("organization", 1), ("actor.subject", 1), ("_id", 1)])

    async def insert_batch(self, events: Sequence[AuditEvent]) -> InsertResult:
        """Stores each event once: an id already stored (a resend) counts as a duplicate, not an error."""
        if not events:
            return InsertResult(0, 0)
        try:
            result = await self._collection.insert_many([event_to_document(e) for e in events], ordered=False)
        except BulkWriteError as error:
            details = error.details
            errors: list[dict[str, Any]] = details.get("writeErrors", [])
            other = [e for e in errors if e.get("code") != DUPLICATE_KEY]
            if other or details.get("writeConcernErrors"):
                raise
            return InsertResult(int(details.get("nInserted", 0)), len(errors))
        return InsertResult(len(result.inserted_ids), 0)

    async def get(self, organization: str, event_id: str) -> AuditEvent | None:
        document = await self._collection.find_one({"_id": event_id, "organization": organization})
        return None if document is None else event_from_document(document)

    async def list(self, conditions: Sequence[Condition], after: str | None, limit: int) -> list[AuditEvent]:
        """Newest first: descending ids (they are time-ordered), resuming below `after`."""
        query: dict[str, Any] = mongo_query(conditions)
        if after is not None:
            query = {"$and": [query, {"_id": {"$lt": after}}]} if query else {"_id": {"$lt": after}}
        cursor = self._collection.find(query).sort("_id", -1).limit(limit)
        return [event_from_document(document) async for document in cursor]
