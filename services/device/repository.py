"""The only code that touches the device service's database.

FerretDB (the embedded default) applies an insert with a unique key atomically, but not a
conditional update: of two concurrent `update_one(filter, ...)` calls both may match. So
whatever must not be lost under concurrency is an insert of its own keyed record (a desired
configuration version, a connection session), and records that are overwritten are written
whole (`replace_one`), never read-modified-written field by field by two kinds of writers.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from medmesh.runtime.errors import AlreadyExists
from medmesh.runtime.mongo import Document, create_query_index
from medmesh.runtime.resources import MongoRepository
from services.device.domain import Device
from services.device.status import (
    NEVER_CONNECTED,
    Battery,
    Firmware,
    Operational,
    OperationalState,
    Session,
    StatusParts,
)
from services.device.twin import KEPT_VERSIONS, DesiredConfig, JsonObject, ReportedConfig


class DeviceRepository(MongoRepository[Device]):
    collection_name = "devices"
    resource_label = "device"

    async def ensure_indexes(self) -> None:
        # List scope: the devices an organization owns or was lent; filters by owner, care
        # organization, patient (which device does this patient use), model and type.
        await create_query_index(self._collection, [("organizations", 1), ("_id", 1)])
        await create_query_index(self._collection, [("organization", 1), ("_id", 1)])
        await create_query_index(self._collection, [("care_organization", 1), ("_id", 1)])
        await create_query_index(self._collection, [("patient", 1), ("_id", 1)])
        await create_query_index(self._collection, [("model", 1), ("_id", 1)])
        await create_query_index(self._collection, [("device_type", 1), ("_id", 1)])
        await self._backfill_organizations()

    async def _backfill_organizations(self) -> None:
        """Registrations stored before `organizations` existed get it, so list scoping finds them."""
        async for document in self._collection.find({"organizations": {"$exists": False}}):
            device = self.from_document(document)
            await self._collection.update_one(
                {"_id": device.id, "revision": device.revision, "organizations": {"$exists": False}},
                {"$set": {"organizations": list(device.organizations)}},
            )

    def to_document(self, resource: Device) -> Document:
        return {
            "_id": resource.id,
            "organization": resource.organization,
            "display_name": resource.display_name,
            "model": resource.model,
            "device_type": resource.device_type,
            "firmware_version": resource.firmware_version,
            "hardware_version": resource.hardware_version,
            "care_organization": resource.care_organization,
            "patient": resource.patient,
            # Derived: the owner and the care organization, what list scoping matches on.
            "organizations": list(resource.organizations),
            "uid": resource.uid,
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
            device_type=document.get("device_type", ""),
            firmware_version=document.get("firmware_version", ""),
            hardware_version=document.get("hardware_version", ""),
            care_organization=document.get("care_organization", ""),
            patient=document.get("patient", ""),
            uid=document.get("uid", ""),
        )


def _encode(values: JsonObject) -> str:
    # Kept as JSON text: configuration keys may hold `.` or start with `$`, which MongoDB field
    # names may not, and nobody queries inside a configuration.
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False)


async def _replace_whole(collection: Any, document: Document) -> None:
    """Upsert by `_id`; two first writers racing make one DuplicateKeyError, retried as a replace."""
    try:
        await collection.replace_one({"_id": document["_id"]}, document, upsert=True)
    except DuplicateKeyError:
        await collection.replace_one({"_id": document["_id"]}, document, upsert=True)


class ConfigRepository:
    """Desired versions, one record each (`{device}/{version}`, unique), and the last report."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._desired = database["device_config_desired"]
        self._reported = database["device_config_reported"]

    async def ensure_indexes(self) -> None:
        await self._desired.create_index([("device_key", 1), ("version", -1)], unique=True)

    async def current_desired(self, device_key: str) -> DesiredConfig | None:
        document = await self._desired.find_one({"device_key": device_key}, sort=[("version", -1)])
        if document is None:
            return None
        return DesiredConfig(device_key, document["version"], json.loads(document["values"]), document["update_time"])

    async def insert_desired(self, config: DesiredConfig) -> None:
        try:
            await self._desired.insert_one(
                {
                    "_id": f"{config.device_key}/{config.version}",
                    "device_key": config.device_key,
                    "version": config.version,
                    "values": _encode(config.values),
                    "update_time": config.update_time,
                }
            )
        except DuplicateKeyError as error:
            raise AlreadyExists(
                f"desired configuration version {config.version} already exists",
                reason="CONFIG_VERSION_EXISTS",
                metadata={"version": str(config.version)},
            ) from error
        # Only versions below the current one go: the newest always stays.
        await self._desired.delete_many(
            {"device_key": config.device_key, "version": {"$lt": config.version - KEPT_VERSIONS}}
        )

    async def reported(self, device_key: str) -> ReportedConfig | None:
        document = await self._reported.find_one({"_id": device_key})
        if document is None:
            return None
        return ReportedConfig(device_key, document["version"], json.loads(document["values"]), document["update_time"])

    async def put_reported(self, config: ReportedConfig) -> None:
        await _replace_whole(
            self._reported,
            {
                "_id": config.device_key,
                "version": config.version,
                "values": _encode(config.values),
                "update_time": config.update_time,
            },
        )

    async def delete_all(self, device_key: str) -> None:
        await self._desired.delete_many({"device_key": device_key})
        await self._reported.delete_one({"_id": device_key})


class StatusRepository:
    """Connection sessions (`{device}/{session}`, one record per connection) and the reported
    parts (`{device}/{part}`), each written whole."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._sessions = database["device_sessions"]
        self._parts = database["device_status"]

    async def ensure_indexes(self) -> None:
        await create_query_index(self._sessions, [("device_key", 1), ("connect_time", -1), ("session_id", -1)])
        await create_query_index(self._parts, [("device_key", 1)])

    async def newest_session(self, device_key: str) -> Session | None:
        document = await self._sessions.find_one(
            {"device_key": device_key, "connect_time": {"$gt": NEVER_CONNECTED}},
            sort=[("connect_time", -1), ("session_id", -1)],
        )
        return None if document is None else _session(document)

    async def open_session(self, session: Session) -> None:
        own_id = f"{session.device_key}/{session.session_id}"
        try:
            await self._sessions.insert_one(
                {
                    "_id": own_id,
                    "device_key": session.device_key,
                    "session_id": session.session_id,
                    "adapter_instance": session.adapter_instance,
                    "adapter_address": session.adapter_address,
                    "remote_address": session.remote_address,
                    "connect_time": session.connect_time,
                    "disconnect_time": session.disconnect_time,
                }
            )
        except DuplicateKeyError:
            # Reported before (a retry): it stays as it is. Closed before its connect report came:
            # it stays closed, with its connect details filled in. Only this session's own
            # (identical) connect reports write here, so the update cannot race anything else.
            await self._sessions.update_one(
                {"_id": own_id, "connect_time": NEVER_CONNECTED},
                {
                    "$set": {
                        "adapter_instance": session.adapter_instance,
                        "adapter_address": session.adapter_address,
                        "remote_address": session.remote_address,
                        "connect_time": session.connect_time,
                    }
                },
            )
        # Never its own record (a closed placeholder of this very session must keep it closed).
        await self._sessions.delete_many(
            {"device_key": session.device_key, "connect_time": {"$lt": session.connect_time}, "_id": {"$ne": own_id}}
        )

    async def close_session(self, device_key: str, session_id: str, at: datetime) -> bool:
        result = await self._sessions.update_one(
            {"_id": f"{device_key}/{session_id}", "disconnect_time": None}, {"$set": {"disconnect_time": at}}
        )
        if result.matched_count:
            return True
        # Already closed (a repeated report) counts as found.
        return await self._sessions.count_documents({"_id": f"{device_key}/{session_id}"}, limit=1) > 0

    async def parts(self, device_key: str) -> StatusParts:
        found = {document["part"]: document async for document in self._parts.find({"device_key": device_key})}
        operational = found.get("operational")
        battery = found.get("battery")
        firmware = found.get("firmware")
        last_seen = found.get("last_seen")
        return StatusParts(
            operational=(
                Operational(OperationalState(operational["state"]), operational["message"], operational["update_time"])
                if operational
                else None
            ),
            battery=Battery(battery["percent"], battery["update_time"]) if battery else None,
            firmware=Firmware(firmware["version"], firmware["update_time"]) if firmware else None,
            last_seen_time=last_seen["time"] if last_seen else None,
        )

    async def put_operational(self, device_key: str, operational: Operational) -> None:
        await _replace_whole(
            self._parts,
            self._part(
                device_key,
                "operational",
                state=operational.state.value,
                message=operational.message,
                update_time=operational.update_time,
            ),
        )

    async def put_battery(self, device_key: str, battery: Battery) -> None:
        await _replace_whole(
            self._parts, self._part(device_key, "battery", percent=battery.percent, update_time=battery.update_time)
        )

    async def put_firmware(self, device_key: str, firmware: Firmware) -> None:
        await _replace_whole(
            self._parts,
            self._part(device_key, "firmware", version=firmware.version, update_time=firmware.update_time),
        )

    async def touch(self, device_key: str, at: datetime) -> None:
        # $max keeps the later time; two touches racing may keep either of two close times.
        query = {"_id": f"{device_key}/last_seen"}
        update = {"$max": {"time": at}, "$set": {"device_key": device_key, "part": "last_seen"}}
        try:
            await self._parts.update_one(query, update, upsert=True)
        except DuplicateKeyError:
            await self._parts.update_one(query, update, upsert=True)

    async def delete_all(self, device_key: str) -> None:
        await self._sessions.delete_many({"device_key": device_key})
        await self._parts.delete_many({"device_key": device_key})

    @staticmethod
    def _part(device_key: str, part: str, **values: Any) -> Document:
        return {"_id": f"{device_key}/{part}", "device_key": device_key, "part": part, **values}


def _session(document: Document) -> Session:
    return Session(
        device_key=document["device_key"],
        session_id=document["session_id"],
        adapter_instance=document["adapter_instance"],
        remote_address=document["remote_address"],
        connect_time=document["connect_time"],
        disconnect_time=document.get("disconnect_time"),
        # Sessions recorded before adapters reported their address have none.
        adapter_address=document.get("adapter_address", ""),
    )
