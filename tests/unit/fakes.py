"""In-memory fakes of the ports services depend on, for the unit layer (no MongoDB, no gRPC peers)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Generic

from medmesh.runtime.errors import AlreadyExists, Unavailable
from medmesh.runtime.filtering import Condition
from medmesh.runtime.resources import R


class InMemoryRepository(Generic[R]):
    """Behaves like `MongoRepository`: id-ordered keyset listing, revision-guarded writes.

    Resources are frozen dataclasses, so storing the objects themselves is as safe as
    MongoDB's copy-on-write round trip.
    """

    def __init__(self, resource_label: str) -> None:
        self.resource_label = resource_label
        self.items: dict[str, R] = {}

    def put(self, resource: R) -> None:
        """Stores unconditionally: how a test plays another writer or seeds state."""
        self.items[resource.id] = resource

    async def insert(self, resource: R) -> None:
        if resource.id in self.items:
            raise AlreadyExists(
                f"{self.resource_label} {resource.id!r} already exists",
                reason=f"{self.resource_label.upper()}_ALREADY_EXISTS",
                metadata={self.resource_label: resource.id},
            )
        self.items[resource.id] = resource

    async def get(self, resource_id: str) -> R | None:
        return self.items.get(resource_id)

    async def list(self, conditions: Sequence[Condition], after: str | None, limit: int) -> list[R]:
        matching = [
            item
            for key, item in sorted(self.items.items())
            if (after is None or key > after) and all(c.matches(item) for c in conditions)
        ]
        # MongoDB reads limit 0 as "no limit" and a negative limit as its absolute value.
        return matching[: abs(limit)] if limit else matching

    async def replace(self, resource: R, expected_revision: int) -> bool:
        current = self.items.get(resource.id)
        if current is None or current.revision != expected_revision:
            return False
        self.items[resource.id] = resource
        return True

    async def delete(self, resource_id: str, expected_revision: int | None = None) -> bool:
        current = self.items.get(resource_id)
        if current is None or (expected_revision is not None and current.revision != expected_revision):
            return False
        del self.items[resource_id]
        return True


class FakeOrganizationDirectory:
    """The device service's view of the organization service: a set of existing names."""

    def __init__(self, existing: Iterable[str] = (), *, unavailable: bool = False) -> None:
        self.existing = set(existing)
        self.unavailable = unavailable
        self.asked: list[str] = []

    async def exists(self, organization: str) -> bool:
        self.asked.append(organization)
        if self.unavailable:
            # What GrpcOrganizationDirectory raises when the peer cannot answer.
            raise Unavailable(
                f"cannot check organization {organization!r}: UNAVAILABLE",
                reason="ORGANIZATION_SERVICE_UNAVAILABLE",
            )
        return organization in self.existing
