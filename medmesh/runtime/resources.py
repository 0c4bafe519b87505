"""What every AIP resource service shares: revisions and etags, update masks, and a
MongoDB repository with keyset paging. Services subclass; nothing here knows a service."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from medmesh.runtime.errors import Aborted, AlreadyExists, InvalidArgument
from medmesh.runtime.filtering import Condition, Converter, mongo_query, parse_filter
from medmesh.runtime.mongo import Document
from medmesh.runtime.pagination import PageRequest, encode_token, page_request


class Resource(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def revision(self) -> int: ...


R = TypeVar("R", bound=Resource)


class ResourceStore(Protocol[R]):
    """What a service needs of its repository; MongoRepository and the unit tests' fake provide it."""

    async def insert(self, resource: R) -> None: ...
    async def get(self, resource_id: str) -> R | None: ...
    async def list(self, conditions: Sequence[Condition], after: str | None, limit: int) -> list[R]: ...
    async def replace(self, resource: R, expected_revision: int) -> bool: ...
    async def delete(self, resource_id: str, expected_revision: int | None = None) -> bool: ...


def now() -> datetime:
    # Millisecond precision: what BSON dates keep, so a stored resource equals the returned one.
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def etag_of(resource_id: str, revision: int) -> str:
    return hashlib.sha256(f"{resource_id}/{revision}".encode()).hexdigest()[:16]


def check_etag(resource_id: str, revision: int, etag: str) -> None:
    """An empty etag means unconditional; a stale one is ABORTED (AIP-154)."""
    if etag and etag != etag_of(resource_id, revision):
        raise Aborted(
            "the resource changed since this etag was read; get it again and retry",
            metadata={"resource": resource_id},
        )


def resolve_update_mask(paths: Sequence[str], updatable: Iterable[str], prefix: str) -> set[str]:
    """The fields an update may change: all of `updatable` for `*`, otherwise the named ones."""
    allowed = set(updatable)
    if list(paths) == ["*"]:
        return allowed
    if not paths:
        raise InvalidArgument.for_field("update_mask", "name at least one field, or `*`", reason="EMPTY_UPDATE_MASK")
    unknown = [p for p in paths if p not in allowed]
    if unknown:
        raise InvalidArgument.for_field(
            "update_mask",
            f"cannot update {', '.join(unknown)} of {prefix}; updatable: {', '.join(sorted(allowed))}",
            reason="FIELD_NOT_UPDATABLE",
        )
    return set(paths)


def page_of(items: list[R], page: PageRequest, query: str) -> tuple[list[R], str]:
    """Given up to size+1 items read after the cursor, the page and the next token."""
    if len(items) <= page.size:
        return items, ""
    kept = items[: page.size]
    return kept, encode_token(kept[-1].id, query)


async def list_page(
    store: ResourceStore[R],
    filter_text: str,
    fields: Mapping[str, tuple[str, Converter]],
    page_size: int,
    page_token: str,
    scope: Sequence[Condition] = (),
) -> tuple[list[R], str]:
    """AIP-132 List: filter, read one more than a page after the cursor, and the next token.

    `scope` holds the server-side conditions the caller cannot lift (tenancy: the caller's
    organization); page tokens are bound to it as well as to the filter.
    """
    conditions = [*scope, *parse_filter(filter_text, fields)]
    query = filter_text if not scope else f"{filter_text}\x00{scope!r}"
    page = page_request(page_size, page_token, query)
    items = await store.list(conditions, page.after, page.size + 1)
    return page_of(items, page, query)


async def replace_checked(store: ResourceStore[R], updated: R, current: R) -> R:
    """Writes an update read at `current`'s revision; ABORTED if someone wrote in between."""
    if not await store.replace(updated, current.revision):
        raise Aborted("the resource changed during the update; retry", metadata={"resource": current.id})
    return updated


async def delete_checked(store: ResourceStore[R], current: R, etag: str) -> None:
    """AIP-135 Delete with an optional etag; ABORTED if the resource changed since it was read."""
    check_etag(current.id, current.revision, etag)
    if not await store.delete(current.id, current.revision):
        raise Aborted("the resource changed during the delete; retry", metadata={"resource": current.id})


class MongoRepository(Generic[R]):
    """Standard persistence of one resource type; `_id` is the resource id, `revision` guards writes."""

    collection_name: str
    resource_label: str  # for messages: "organization", "device"

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._collection = database[self.collection_name]

    def to_document(self, resource: R) -> Document:
        raise NotImplementedError

    def from_document(self, document: Document) -> R:
        raise NotImplementedError

    async def ensure_indexes(self) -> None:
        """Subclasses add the indexes their list filters need."""

    async def insert(self, resource: R) -> None:
        try:
            await self._collection.insert_one(self.to_document(resource))
        except DuplicateKeyError as error:
            raise AlreadyExists(
                f"{self.resource_label} {resource.id!r} already exists",
                reason=f"{self.resource_label.upper()}_ALREADY_EXISTS",
                metadata={self.resource_label: resource.id},
            ) from error

    async def get(self, resource_id: str) -> R | None:
        document = await self._collection.find_one({"_id": resource_id})
        return None if document is None else self.from_document(document)

    async def list(self, conditions: Sequence[Condition], after: str | None, limit: int) -> list[R]:
        query: dict[str, Any] = mongo_query(conditions)
        if after is not None:
            query = {"$and": [query, {"_id": {"$gt": after}}]} if query else {"_id": {"$gt": after}}
        cursor = self._collection.find(query).sort("_id", 1).limit(limit)
        return [self.from_document(document) async for document in cursor]

    async def replace(self, resource: R, expected_revision: int) -> bool:
        """Writes only if nobody else wrote since `expected_revision`; False if someone did."""
        result = await self._collection.replace_one(
            {"_id": resource.id, "revision": expected_revision}, self.to_document(resource)
        )
        return result.matched_count == 1

    async def delete(self, resource_id: str, expected_revision: int | None = None) -> bool:
        query: dict[str, Any] = {"_id": resource_id}
        if expected_revision is not None:
            query["revision"] = expected_revision
        result = await self._collection.delete_one(query)
        return result.deleted_count == 1
