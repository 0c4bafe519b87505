"""The only code that touches the organization service's database."""

from __future__ import annotations

from medmesh.runtime.mongo import Document, create_query_index
from medmesh.runtime.resources import MongoRepository
from services.organization.domain import Organization, OrganizationKind


class OrganizationRepository(MongoRepository[Organization]):
    collection_name = "organizations"
    resource_label = "organization"

    async def ensure_indexes(self) -> None:
        await create_query_index(self._collection, [("kind", 1), ("_id", 1)])
        await create_query_index(self._collection, [("display_name", 1), ("_id", 1)])

    def to_document(self, resource: Organization) -> Document:
        return {
            "_id": resource.id,
            "display_name": resource.display_name,
            "kind": resource.kind.value,
            "create_time": resource.create_time,
            "update_time": resource.update_time,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> Organization:
        return Organization(
            id=document["_id"],
            display_name=document["display_name"],
            kind=OrganizationKind(document["kind"]),
            create_time=document["create_time"],
            update_time=document["update_time"],
            revision=document["revision"],
        )
