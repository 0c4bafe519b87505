"""One AsyncMongoClient per service process, bound to that service's own database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from medmesh.runtime.settings import Settings

Document = dict[str, Any]


def connect(settings: Settings) -> tuple[AsyncMongoClient[Document], AsyncDatabase[Document]]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        settings.mongodb_uri,
        appname=f"medmesh-{settings.service}",
        tz_aware=True,
        serverSelectionTimeoutMS=3000,
        connectTimeoutMS=3000,
    )
    return client, client[settings.mongodb_database]


# Per client (clients to the same servers compare equal): the backend answers every query by scanning.
_SCANS_ANYWAY: dict[Any, bool] = {}


async def create_query_index(collection: AsyncCollection[Document], keys: Sequence[tuple[str, int]]) -> None:
    """A secondary index that serves queries: created on MongoDB, not on FerretDB.

    FerretDB v1 answers every query but by `_id` by scanning, index or not (measured: a find by
    device sorted by time took 1.1-1.6 s over 12,000 observations either way), while each index
    costs every write: FerretDB's CPU per inserted observation went from 48 to 86 us with the
    observation service's three query indexes. Unique indexes are constraints and always made.
    """
    client = collection.database.client
    if client not in _SCANS_ANYWAY:
        info = await client.admin.command("buildInfo")
        _SCANS_ANYWAY[client] = "ferretdbFeatures" in info or "ferretdb" in info
    if not _SCANS_ANYWAY[client]:
        await collection.create_index(list(keys))


async def ping(database: AsyncDatabase[Document]) -> None:
    """Raises if the database cannot answer; the health check of every Mongo-backed service."""
    await database.command("ping")


class IndexedRepository(Protocol):
    async def ensure_indexes(self) -> None: ...


def readiness(
    database: AsyncDatabase[Document],
    *repositories: IndexedRepository,
    setup: Sequence[Callable[[], Awaitable[None]]] = (),
) -> Callable[[], Awaitable[None]]:
    """Ready = the database answers a ping, the repositories' indexes exist and `setup` has run.

    Indexes and first-run setup (idempotent steps such as creating the manufacturer
    organization) happen on the first successful check rather than at start-up, so a service
    started before its database comes up recovers by itself.
    """
    prepared = False

    async def check() -> None:
        nonlocal prepared
        await ping(database)
        if not prepared:
            for repository in repositories:
                await repository.ensure_indexes()
            for step in setup:
                await step()
            prepared = True

    return check
