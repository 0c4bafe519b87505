"""The only code that touches the device service's database.

FerretDB (the embedded default) applies an insert with a unique key atomically, but not a
conditional update: of two concurrent `update_one(filter, ...)` calls both may match. So
whatever must not be lost under concurrency is an insert of its own keyed record (a desired
configuration version, a claim of a connection state's next revision), and records that are
overwritten are written whole (`replace_one`), never read-modified-written field by field by
two kinds of writers.

FerretDB also reads a query from SQLite by index only when its filter is exactly `{"_id": x}`;
any other filter reads and decodes every document of the collection. So what runs whenever a
device connects (connection states, reported status, the desired configuration) is read and
written by `_id` alone, keyed by what it is looked up by; only one-time migrations and the
registry's list queries filter otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from medmesh.runtime.errors import AlreadyExists
from medmesh.runtime.mongo import Document, create_query_index
from medmesh.runtime.resources import MongoRepository, now
from services.device.domain import Device
from services.device.status import (
    NEVER_CONNECTED,
    Battery,
    ConnectionState,
    EarlyClose,
    Firmware,
    Operational,
    OperationalState,
    Session,
    StatusParts,
)
from services.device.twin import KEPT_VERSIONS, DesiredConfig, JsonObject, ReportedConfig

log = logging.getLogger(__name__)

# How long a claim is kept once superseded (`ClaimedRecords`): far longer than a change takes
# (FerretDB gives up on a write that waits 10 s for SQLite).
CLAIM_GRACE = timedelta(minutes=1)
# Claims kept of one record however fast it changes (a device in a reconnect loop): each is
# listed in the record, which is written whole on every change.
MAX_CLAIMS = 64


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
    """Desired versions, one record each (`{device}/{version}`, unique), a copy of the highest
    (by device) and the last report (by device).

    The copy is what readers start from; a version inserted after it (its writer has not copied
    it yet, stopped before it did, or was overtaken by the copy of an older version) is found
    by reading the next version's `_id`, so the copy may lag but never misleads. Versions are
    consecutive, so each insert deletes the one version that falls out of the kept ones.
    """

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._database = database
        self._desired = database["device_config_desired"]
        self._current = database["device_config_current"]
        self._reported = database["device_config_reported"]

    async def ensure_indexes(self) -> None:
        await self._desired.create_index([("device_key", 1), ("version", -1)], unique=True)
        await run_once(self._database, "device-config-current", self._copy_highest_versions)

    async def current_desired(self, device_key: str) -> DesiredConfig | None:
        document = await self._current.find_one({"_id": device_key})
        version = document["version"] if document else 0
        while (newer := await self._desired.find_one({"_id": _version_id(device_key, version + 1)})) is not None:
            document, version = newer, version + 1
        if document is None:
            return None
        return DesiredConfig(device_key, document["version"], json.loads(document["values"]), document["update_time"])

    async def insert_desired(self, config: DesiredConfig) -> None:
        document = {
            "_id": _version_id(config.device_key, config.version),
            "device_key": config.device_key,
            "version": config.version,
            "values": _encode(config.values),
            "update_time": config.update_time,
        }
        try:
            await self._desired.insert_one(document)
        except DuplicateKeyError as error:
            raise AlreadyExists(
                f"desired configuration version {config.version} already exists",
                reason="CONFIG_VERSION_EXISTS",
                metadata={"version": str(config.version)},
            ) from error
        await _replace_whole(self._current, {**document, "_id": config.device_key})
        dropped = config.version - KEPT_VERSIONS - 1
        if dropped > 0:
            await self._desired.delete_one({"_id": _version_id(config.device_key, dropped)})

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
        current = await self.current_desired(device_key)
        highest = current.version if current else 0
        for version in range(max(1, highest - KEPT_VERSIONS), highest + 1):
            await self._desired.delete_one({"_id": _version_id(device_key, version)})
        await self._current.delete_one({"_id": device_key})
        await self._reported.delete_one({"_id": device_key})

    async def _copy_highest_versions(self) -> None:
        """Devices configured before the copy existed get one (a scan, once)."""
        highest: dict[str, int] = {}
        async for document in self._desired.find({}, {"device_key": 1, "version": 1}):
            key, version = document["device_key"], document["version"]
            highest[key] = max(version, highest.get(key, 0))
        for key, version in highest.items():
            if await self._current.find_one({"_id": key}) is not None:
                continue
            found = await self._desired.find_one({"_id": _version_id(key, version)})
            if found is not None:
                await _replace_whole(self._current, {**found, "_id": key})


def _version_id(device_key: str, version: int) -> str:
    return f"{device_key}/{version}"


class ClaimedRecords:
    """Records by key that change only through claims (see the module docstring).

    A change claims the next revision by inserting `{key}@{revision}` with the whole new record,
    then copies it to `current`, where readers start. Of two concurrent changes one insert
    fails; that writer reads the winner's claim and applies its change again to that. A claim
    past the copy (its writer is between the claim and the copy, stopped there, or its copy
    was overtaken by an older one) is found by reading the next revision's `_id`: one read
    that normally finds nothing.

    Each record lists the claims still stored. A claim goes once its successor was made
    `CLAIM_GRACE` ago, far longer than a change takes, so no writer can still be working from
    the revision before it (which would claim it again), or once `MAX_CLAIMS` newer ones exist.
    Only a writer held up that long, while the record changed that often, could claim a deleted
    revision again and store a state that misses the changes since (until the next change).
    """

    def __init__(self, current: AsyncCollection[Document], claims: AsyncCollection[Document]) -> None:
        self._current = current
        self._claims = claims

    async def read(self, key: str) -> Document | None:
        latest = await self._caught_up(key, await self._current.find_one({"_id": key}))
        return None if latest is None else latest["record"]

    async def change(self, key: str, change: Callable[[Document | None], Document | None]) -> Document | None:
        """Applies `change` (None: no change) to the record; returns the record now stored."""
        latest = await self._current.find_one({"_id": key})
        caught_up = False
        while True:
            record = None if latest is None else latest["record"]
            changed = change(record)
            if changed is None:
                if caught_up:
                    return record
                # Nothing to claim, so no failed insert would tell of a newer revision: look.
                latest, caught_up = await self._caught_up(key, latest), True
                continue
            at = now()
            revision = (latest["revision"] if latest else 0) + 1
            claims, expired = _claims_after(latest["claims"] if latest else [], revision, at)
            document = {"_id": key, "revision": revision, "claims": claims, "record": changed}
            try:
                await self._claims.insert_one({"_id": _claim_id(key, revision), "document": document})
            except DuplicateKeyError:
                latest, caught_up = await self._caught_up(key, latest), True
                continue
            await asyncio.gather(
                _replace_whole(self._current, document),
                *(self._claims.delete_one({"_id": _claim_id(key, old)}) for old in expired),
            )
            return changed

    async def delete(self, key: str) -> None:
        latest = await self._caught_up(key, await self._current.find_one({"_id": key}))
        if latest is None:
            return
        await self._current.delete_one({"_id": key})
        for claim in latest["claims"]:
            await self._claims.delete_one({"_id": _claim_id(key, claim["revision"])})

    async def _caught_up(self, key: str, latest: Document | None) -> Document | None:
        revision = latest["revision"] if latest else 0
        while (claim := await self._claims.find_one({"_id": _claim_id(key, revision + 1)})) is not None:
            latest, revision = claim["document"], revision + 1
        return latest


def _claim_id(key: str, revision: int) -> str:
    return f"{key}@{revision}"


def _claims_after(previous: list[Document], revision: int, at: datetime) -> tuple[list[Document], list[int]]:
    """The claims listed once `revision` is claimed at `at`, and the revisions whose claims go."""
    kept: list[Document] = []
    expired: list[int] = []
    for index, claim in enumerate(previous):
        superseded = previous[index + 1]["time"] if index + 1 < len(previous) else at
        if superseded <= at - CLAIM_GRACE or revision - claim["revision"] >= MAX_CLAIMS:
            expired.append(claim["revision"])
        else:
            kept.append(claim)
    return [*kept, {"revision": revision, "time": at}], expired


_PARTS = ("operational", "battery", "firmware", "last_seen")


class StatusRepository:
    """Connection states (`ClaimedRecords` by device key) and the reported parts
    (`{device}/{part}`), each written whole."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._database = database
        self._connections = ClaimedRecords(database["device_connections"], database["device_connection_claims"])
        self._parts = database["device_status"]

    async def ensure_indexes(self) -> None:
        await run_once(self._database, "device-connections", self._adopt_sessions)

    async def connections(self, device_key: str) -> ConnectionState:
        return _connection_state(await self._connections.read(device_key))

    async def change_connections(
        self, device_key: str, change: Callable[[ConnectionState], ConnectionState | None]
    ) -> ConnectionState:
        def changed(record: Document | None) -> Document | None:
            state = change(_connection_state(record))
            return None if state is None else _connection_document(state)

        return _connection_state(await self._connections.change(device_key, changed))

    async def parts(self, device_key: str) -> StatusParts:
        operational, battery, firmware, last_seen = await asyncio.gather(
            *(self._parts.find_one({"_id": f"{device_key}/{part}"}) for part in _PARTS)
        )
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
        await self._connections.delete(device_key)
        for part in _PARTS:
            await self._parts.delete_one({"_id": f"{device_key}/{part}"})

    async def _adopt_sessions(self) -> None:
        """Connections recorded in the layout before (a record per session, found by device; a
        scan, once): each device's newest session becomes its state, unless it has one."""
        sessions = self._database["device_sessions"]
        newest: dict[str, Session] = {}
        async for document in sessions.find({"connect_time": {"$gt": NEVER_CONNECTED}}):
            session = _session(document)
            known = newest.get(session.device_key)
            if known is None or session.order > known.order:
                newest[session.device_key] = session
        for key, session in newest.items():
            await self.change_connections(key, _adopted(session))
        await sessions.drop()

    @staticmethod
    def _part(device_key: str, part: str, **values: Any) -> Document:
        return {"_id": f"{device_key}/{part}", "device_key": device_key, "part": part, **values}


def _adopted(session: Session) -> Callable[[ConnectionState], ConnectionState | None]:
    """`session` as the state of a device that has none yet."""
    return lambda state: None if state.newest is not None else ConnectionState(session)


def _connection_document(state: ConnectionState) -> Document:
    return {
        "newest": None if state.newest is None else _session_document(state.newest),
        "early_closes": [
            {"session_id": close.session_id, "disconnect_time": close.disconnect_time} for close in state.early_closes
        ],
    }


def _connection_state(record: Document | None) -> ConnectionState:
    if record is None:
        return ConnectionState()
    return ConnectionState(
        newest=None if record["newest"] is None else _session(record["newest"]),
        early_closes=tuple(EarlyClose(c["session_id"], c["disconnect_time"]) for c in record["early_closes"]),
    )


def _session_document(session: Session) -> Document:
    return {
        "device_key": session.device_key,
        "session_id": session.session_id,
        "adapter_instance": session.adapter_instance,
        "adapter_address": session.adapter_address,
        "remote_address": session.remote_address,
        "connect_time": session.connect_time,
        "disconnect_time": session.disconnect_time,
    }


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


async def run_once(database: AsyncDatabase[Document], name: str, migration: Callable[[], Awaitable[None]]) -> None:
    """Runs a one-time change of the stored data unless `device_migrations` records it as done.
    Migrations must be safe to run twice (two replicas starting together). One that fails is
    logged and tried again at the next start: the service works without it, on what it left."""
    done = database["device_migrations"]
    if await done.find_one({"_id": name}) is not None:
        return
    try:
        await migration()
    except Exception:  # old data must not keep the service from starting
        log.warning("migration %s of the device service's data failed", name, exc_info=True)
        return
    await _replace_whole(done, {"_id": name, "time": now()})
