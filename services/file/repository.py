"""The only code that touches the file service's database: file records and their settlements.

FerretDB makes a unique-index insert atomic but not a conditional update, so the two decisions
that must never be made twice are unique inserts: a create's idempotency key (`request_key`,
unique) and how a file ends (one `file_settlements` document per file, keyed by the file id).
"""

from __future__ import annotations

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from medmesh.runtime.mongo import Document, create_query_index
from medmesh.runtime.resources import MongoRepository
from services.file.domain import Ending, File, FileState, Settlement

SETTLEMENTS_COLLECTION = "file_settlements"


class FileRepository(MongoRepository[File]):
    collection_name = "files"
    resource_label = "file"

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        super().__init__(database)
        self._settlements = database[SETTLEMENTS_COLLECTION]

    async def ensure_indexes(self) -> None:
        # Listing is per organization in `_id` order, filtered by device or patient; the sweeper
        # looks for PENDING files by expiry; retried creates find their file by `request_key`.
        await create_query_index(self._collection, [("organization", 1), ("_id", 1)])
        await create_query_index(self._collection, [("device", 1), ("_id", 1)])
        await create_query_index(self._collection, [("patient", 1), ("_id", 1)])
        await create_query_index(self._collection, [("state", 1), ("upload_expire_time", 1)])
        await self._collection.create_index([("request_key", 1)], unique=True)

    async def find_by_request_key(self, request_key: str) -> File | None:
        document = await self._collection.find_one({"request_key": request_key})
        return None if document is None else self.from_document(document)

    async def settle(self, settlement: Settlement) -> Settlement:
        """Stores `settlement` unless the file already has one; returns the one that counts."""
        try:
            await self._settlements.insert_one(settlement_document(settlement))
        except DuplicateKeyError:
            existing = await self.settlement(settlement.file_id)
            if existing is None:  # only if someone deleted it in between: nothing to defer to
                raise
            return existing
        return settlement

    async def settlement(self, file_id: str) -> Settlement | None:
        document = await self._settlements.find_one({"_id": file_id})
        return None if document is None else settlement_from_document(document)

    def to_document(self, resource: File) -> Document:
        return {
            "_id": resource.id,
            "organization": resource.organization,
            "display_name": resource.display_name,
            "content_type": resource.content_type,
            "size_bytes": resource.size_bytes,
            "sha256": resource.sha256,
            "device": resource.device,
            "patient": resource.patient,
            "session": resource.session,
            "state": resource.state.value,
            "failure_reason": resource.failure_reason,
            "create_time": resource.create_time,
            "complete_time": resource.complete_time,
            "upload_expire_time": resource.upload_expire_time,
            "object_key": resource.object_key,
            "upload_id": resource.upload_id,
            "part_size": resource.part_size,
            "request_key": resource.request_key,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> File:
        return File(
            id=document["_id"],
            organization=document["organization"],
            display_name=document.get("display_name", ""),
            content_type=document["content_type"],
            size_bytes=int(document["size_bytes"]),
            sha256=document["sha256"],
            device=document.get("device", ""),
            patient=document.get("patient", ""),
            session=document.get("session", ""),
            state=FileState(document["state"]),
            failure_reason=document.get("failure_reason", ""),
            create_time=document["create_time"],
            complete_time=document.get("complete_time"),
            upload_expire_time=document["upload_expire_time"],
            object_key=document["object_key"],
            upload_id=document.get("upload_id", ""),
            part_size=int(document.get("part_size", 0)),
            request_key=document["request_key"],
            revision=document["revision"],
        )


def settlement_document(settlement: Settlement) -> Document:
    return {
        "_id": settlement.file_id,
        "ending": settlement.ending.value,
        "failure_reason": settlement.failure_reason,
        "decide_time": settlement.decide_time,
    }


def settlement_from_document(document: Document) -> Settlement:
    return Settlement(
        file_id=document["_id"],
        ending=Ending(document["ending"]),
        failure_reason=document.get("failure_reason", ""),
        decide_time=document["decide_time"],
    )
