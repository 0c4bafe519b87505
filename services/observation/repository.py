"""The only code that touches the observation service's database.

FerretDB v1 (the embedded default) has no transactions and its conditional updates are not
atomic under concurrency; a unique-index insert is. So everything here is insert-only:

- `observations`: one document per (device, message_id). A batch is one unordered
  `insert_many`; a duplicate-key error on an item means "stored before" (DUPLICATE), which is
  how a resent batch is stored once, whichever adapter instance or retry sends it.
- `series`: one document per (organization, device, metric) ever stored, inserted once (a
  duplicate is simply already there). It tells GetLatestObservations which metrics to look up,
  so "latest" is an index seek per metric on `observations` and never an update that could
  race (a "latest" document upserted with a time guard is a conditional update: under
  concurrent ingest for one device it could go backwards on FerretDB).

Indexes, and the query each one serves:

observations
- `_id`, a hash of (device, message_id): GetObservation, and the idempotency key of ingest
  (a unique index on (device, message_id) as well would say the same again: measured on
  FerretDB, it cost 10 of 58 us of database CPU per observation inserted).
- (device, time, _id): ListObservations of a device, in (time, id) keyset order, for platform
  admins (no organization condition); aggregation of a device for platform admins.
- (organization, device, metric, time, _id): everything about a device within its data
  organization, which is what non-admin callers always ask: a device's list with or without
  a metric filter, aggregation over given metrics, and the latest value per metric
  (equality on the first three, then newest first).
- (patient, time, _id): ListObservations and aggregation of a patient (the organization is
  part of the patient's name, so that condition is always met by the index's matches).

series
- `_id` (organization, device, metric): the insert-once key.
- (device, organization): the metrics of a device, in one organization or all of them.

Aggregation is computed in Python over an index-supported, projected scan: FerretDB v1.24.2
implements `$match` and `$group`, but of the accumulators only `$sum` and `$count` (measured:
`$min`, `$max`, `$avg`, `$stdDevPop`, `$push`, `$first` are "not implemented yet") and no
arithmetic expression (`$subtract`, `$mod`, `$multiply`, `$floor`, `$dateTrunc`, `$toLong`), so
neither the statistics nor a time bin can be computed in the database there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from medmesh.runtime.filtering import Condition, mongo_query
from medmesh.runtime.mongo import Document, create_query_index
from services.observation.domain import Observation, Waveform

DUPLICATE_KEY = 11000
# Process-local memory of series known to exist, so a steady stream writes nothing to `series`.
MAX_KNOWN_SERIES = 100_000
MAX_SERIES_PER_DEVICE = 500

Cursor = tuple[datetime, str]  # (time, id) of the last observation already returned


def series_key(organization: str, device: str, metric: str) -> str:
    # None of the three can contain a space (see their name patterns).
    return f"{organization} {device} {metric}"


def _after(cursor: Cursor) -> dict[str, Any]:
    moment, observation_id = cursor
    return {"$or": [{"time": {"$gt": moment}}, {"time": moment, "_id": {"$gt": observation_id}}]}


class ObservationRepository:
    collection_name = "observations"
    series_collection_name = "series"

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._collection = database[self.collection_name]
        self._series = database[self.series_collection_name]
        self._known_series: set[str] = set()

    async def ensure_indexes(self) -> None:
        # What each index serves is listed in the module docstring.
        observations = self._collection
        await create_query_index(observations, [("device", ASCENDING), ("time", ASCENDING), ("_id", ASCENDING)])
        by_series = ["organization", "device", "metric", "time", "_id"]
        await create_query_index(observations, [(key, ASCENDING) for key in by_series])
        await create_query_index(observations, [("patient", ASCENDING), ("time", ASCENDING), ("_id", ASCENDING)])
        await create_query_index(self._series, [("device", ASCENDING), ("organization", ASCENDING)])

    # --- ingest -------------------------------------------------------------------------------

    async def insert_batch(self, observations: Sequence[Observation]) -> list[bool]:
        """Stores each observation once; per item, True if stored now, False if it was stored before.

        Durable when it returns (acknowledged writes). Any error other than a duplicate key is
        raised: the caller answers the whole batch with an error and the sender retries it, which
        then finds the items that did get stored as duplicates.
        """
        if not observations:
            return []
        # The series first: if this fails nothing is stored, and a retry registers them.
        await self._register_series(observations)
        stored = [True] * len(observations)
        try:
            await self._collection.insert_many([self.to_document(o) for o in observations], ordered=False)
        except BulkWriteError as error:
            details = error.details
            errors: list[dict[str, Any]] = details.get("writeErrors", [])
            if any(e.get("code") != DUPLICATE_KEY for e in errors) or details.get("writeConcernErrors"):
                raise
            # `index` is the position in the list sent, which is `observations` itself.
            for write_error in errors:
                stored[int(write_error["index"])] = False
        return stored

    async def _register_series(self, observations: Sequence[Observation]) -> None:
        new = {series_key(o.organization, o.device, o.metric): o for o in observations}
        for key in self._known_series.intersection(new):
            del new[key]
        if not new:
            return
        documents = [
            {"_id": key, "organization": o.organization, "device": o.device, "metric": o.metric}
            for key, o in new.items()
        ]
        try:
            await self._series.insert_many(documents, ordered=False)
        except BulkWriteError as error:
            details = error.details
            if any(e.get("code") != DUPLICATE_KEY for e in details.get("writeErrors", [])):
                raise
            if details.get("writeConcernErrors"):
                raise
        if len(self._known_series) + len(new) > MAX_KNOWN_SERIES:
            self._known_series.clear()  # forgetting costs one duplicate insert per series, nothing more
        self._known_series.update(new)

    # --- queries ------------------------------------------------------------------------------

    async def get(self, observation_id: str) -> Observation | None:
        document = await self._collection.find_one({"_id": observation_id})
        return None if document is None else self.from_document(document)

    async def list_observations(
        self, conditions: Sequence[Condition], after: Cursor | None, limit: int
    ) -> list[Observation]:
        """Oldest first by (time, id), resuming after `after`: no gap and no repeat, even at equal times."""
        clauses = [mongo_query(conditions)] if conditions else []
        if after is not None:
            clauses.append(_after(after))
        query = clauses[0] if len(clauses) == 1 else ({"$and": clauses} if clauses else {})
        cursor = self._collection.find(query).sort([("time", ASCENDING), ("_id", ASCENDING)]).limit(limit)
        return [self.from_document(document) async for document in cursor]

    async def numeric_values(
        self, conditions: Sequence[Condition], metrics: Sequence[str], limit: int
    ) -> AsyncIterator[tuple[str, datetime, float]]:
        """(metric, time, value) of the numeric observations matching; at most `limit`, in no particular order."""
        query = {"$and": [mongo_query(conditions), {"metric": {"$in": list(metrics)}}]}
        query["$and"].append({"numeric_value": {"$exists": True}})
        projection = {"_id": 0, "metric": 1, "time": 1, "numeric_value": 1}
        async for document in self._collection.find(query, projection).limit(limit):
            yield document["metric"], document["time"], float(document["numeric_value"])

    async def latest(self, device: str, organization: str | None) -> list[Observation]:
        """The newest observation of each (organization, metric) series of `device`;
        of one organization's series, or of every organization's when `organization` is None."""
        query: dict[str, Any] = {"device": device}
        if organization is not None:
            query["organization"] = organization
        series = [s async for s in self._series.find(query).limit(MAX_SERIES_PER_DEVICE)]
        # One index seek per series, all at once.
        found = await asyncio.gather(
            *(
                self._collection.find_one(
                    {"organization": entry["organization"], "device": device, "metric": entry["metric"]},
                    sort=[("time", DESCENDING), ("_id", DESCENDING)],
                )
                for entry in series
            )
        )
        return [self.from_document(document) for document in found if document is not None]

    # --- mapping ------------------------------------------------------------------------------

    @staticmethod
    def to_document(observation: Observation) -> Document:
        document: Document = {
            "_id": observation.id,
            "device": observation.device,
            "message_id": observation.message_id,
            "metric": observation.metric,
            "time": observation.time,
            "organization": observation.organization,
            "patient": observation.patient,
            "receive_time": observation.receive_time,
        }
        if observation.unit:
            document["unit"] = observation.unit
        if observation.session:
            document["session"] = observation.session
        # Only the value that is set is stored: `numeric_value: {$exists: true}` selects numbers.
        if observation.numeric_value is not None:
            document["numeric_value"] = observation.numeric_value
        if observation.boolean_value is not None:
            document["boolean_value"] = observation.boolean_value
        if observation.string_value is not None:
            document["string_value"] = observation.string_value
        if observation.waveform is not None:
            waveform: Document = {
                "sample_rate_hz": observation.waveform.sample_rate_hz,
                "samples": list(observation.waveform.samples),
            }
            if observation.waveform.start_time is not None:
                waveform["start_time"] = observation.waveform.start_time
            document["waveform"] = waveform
        return document

    @staticmethod
    def from_document(document: Document) -> Observation:
        stored_waveform = document.get("waveform")
        waveform = (
            Waveform(
                float(stored_waveform["sample_rate_hz"]),
                tuple(float(s) for s in stored_waveform["samples"]),
                stored_waveform.get("start_time"),
            )
            if stored_waveform is not None
            else None
        )
        numeric = document.get("numeric_value")
        return Observation(
            id=document["_id"],
            device=document["device"],
            message_id=document["message_id"],
            metric=document["metric"],
            time=document["time"],
            organization=document["organization"],
            patient=document.get("patient", ""),
            receive_time=document["receive_time"],
            unit=document.get("unit", ""),
            session=document.get("session", ""),
            numeric_value=None if numeric is None else float(numeric),
            boolean_value=document.get("boolean_value"),
            string_value=document.get("string_value"),
            waveform=waveform,
        )
