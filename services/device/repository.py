"""The only code that touches the device service's database."""

from __future__ import annotations

from medmesh.runtime.mongo import Document
from medmesh.runtime.resources import MongoRepository
from services.device.domain import Device


class DeviceRepository(MongoRepository[Device]):
    collection_name = "devices"
    resource_label = "device"

    async def ensure_indexes(self) -> None:
        # List filters: devices of an organization (the common portal query), by model.
        await self._collection.create_index([("organization", 1), ("_id", 1)])
        await self._collection.create_index([("model", 1), ("_id", 1)])

    def to_document(self, resource: Device) -> Document:
        return {
            "_id": resource.id,
            "organization": resource.organization,
            "display_name": resource.display_name,
            "model": resource.model,
            "create_time": resource.create_time,
            "update_time": resource.update_time,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> Device:
        return Device(
            id=document["_id"],
            organization=document["organization"],
            display_name=document["display_name"],
            model=document["model"],
            create_time=document["create_time"],
            update_time=document["update_time"],
            revision=document["revision"],
        )
