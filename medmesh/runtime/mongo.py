"""One AsyncMongoClient per service process, bound to that service's own database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from pymongo import AsyncMongoClient
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
