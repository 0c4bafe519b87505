"""The only code that touches the alert service's database (`medmesh_alert`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from medmesh.runtime.filtering import Condition, mongo_query
from medmesh.runtime.mongo import Document, create_query_index
from medmesh.runtime.resources import MongoRepository
from services.alert.domain import Alert, AlertRule, AlertState, Operator, RuleState, Severity


class AlertRepository(MongoRepository[Alert]):
    collection_name = "alerts"
    resource_label = "alert"

    async def ensure_indexes(self) -> None:
        # The one-active-alert-per-(rule, device) guard: inserts are atomic against a unique index,
        # conditional updates on FerretDB are not.
        await self._collection.create_index([("active_key", 1)], unique=True)
        # Lists are newest first within an organization, often narrowed to the active ones, a device or a patient.
        await create_query_index(self._collection, [("organization", 1), ("_id", 1)])
        await create_query_index(self._collection, [("organization", 1), ("state", 1), ("_id", 1)])
        await create_query_index(self._collection, [("organization", 1), ("device", 1), ("_id", 1)])
        await create_query_index(self._collection, [("organization", 1), ("patient", 1), ("_id", 1)])

    async def list(self, conditions: Sequence[Condition], after: str | None, limit: int) -> list[Alert]:
        """Newest first: descending ids (they are time-ordered), resuming below `after`."""
        query: dict[str, Any] = mongo_query(conditions)
        if after is not None:
            query = {"$and": [query, {"_id": {"$lt": after}}]} if query else {"_id": {"$lt": after}}
        cursor = self._collection.find(query).sort("_id", -1).limit(limit)
        return [self.from_document(document) async for document in cursor]

    async def find_active(self, active_key: str) -> Alert | None:
        document = await self._collection.find_one({"active_key": active_key})
        return None if document is None else self.from_document(document)

    def to_document(self, resource: Alert) -> Document:
        return {
            "_id": resource.id,
            "organization": resource.organization,
            "device": resource.device,
            "patient": resource.patient,
            "severity": resource.severity.value,
            "state": resource.state.value,
            "title": resource.title,
            "description": resource.description,
            "metric": resource.metric,
            "rule": resource.rule,
            "raise_time": resource.raise_time,
            "clear_time": resource.clear_time,
            "cleared_by": resource.cleared_by,
            "clear_note": resource.clear_note,
            "active_key": resource.active_key,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> Alert:
        return Alert(
            id=document["_id"],
            organization=document["organization"],
            device=document.get("device", ""),
            patient=document.get("patient", ""),
            severity=Severity(document["severity"]),
            state=AlertState(document["state"]),
            title=document.get("title", ""),
            description=document.get("description", ""),
            metric=document.get("metric", ""),
            rule=document.get("rule", ""),
            raise_time=document["raise_time"],
            clear_time=document.get("clear_time"),
            cleared_by=document.get("cleared_by", ""),
            clear_note=document.get("clear_note", ""),
            revision=document["revision"],
        )


class AlertRuleRepository(MongoRepository[AlertRule]):
    collection_name = "alert_rules"
    resource_label = "alert_rule"

    async def ensure_indexes(self) -> None:
        # Evaluation reads an organization's enabled rules; lists go by organization in `_id` order.
        await create_query_index(self._collection, [("organization", 1), ("enabled", 1), ("_id", 1)])
        await create_query_index(self._collection, [("organization", 1), ("_id", 1)])

    def to_document(self, resource: AlertRule) -> Document:
        return {
            "_id": resource.id,
            "organization": resource.organization,
            "display_name": resource.display_name,
            "metric": resource.metric,
            # By member name: the symbols (`>=`) are for people, names are safer in queries.
            "operator": resource.operator.name,
            "threshold": resource.threshold,
            "duration_ms": resource.duration // timedelta(milliseconds=1),
            "severity": resource.severity.value,
            "device": resource.device,
            "enabled": resource.enabled,
            "clear_automatically": resource.clear_automatically,
            "create_time": resource.create_time,
            "update_time": resource.update_time,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> AlertRule:
        return AlertRule(
            id=document["_id"],
            organization=document["organization"],
            display_name=document.get("display_name", ""),
            metric=document["metric"],
            operator=Operator[document["operator"]],
            threshold=float(document["threshold"]),
            duration=timedelta(milliseconds=int(document.get("duration_ms", 0))),
            severity=Severity(document["severity"]),
            device=document.get("device", ""),
            enabled=bool(document.get("enabled", True)),
            clear_automatically=bool(document.get("clear_automatically", True)),
            create_time=document["create_time"],
            update_time=document["update_time"],
            revision=document["revision"],
        )


class RuleStateRepository:
    """Where each (rule, device) stands. Whole-document upserts, last writer wins (see `evaluation`)."""

    collection_name = "rule_states"

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._collection = database[self.collection_name]

    async def ensure_indexes(self) -> None:
        await create_query_index(self._collection, [("rule", 1)])

    async def get(self, state_id: str) -> RuleState | None:
        document = await self._collection.find_one({"_id": state_id})
        return None if document is None else self.from_document(document)

    async def save(self, state: RuleState) -> None:
        document = self.to_document(state)
        try:
            await self._collection.replace_one({"_id": state.id}, document, upsert=True)
        except DuplicateKeyError:
            # Two first saves of the same state raced and both tried to insert (measured on FerretDB with two
            # instances): the other one's insert won, so the document exists now and a plain replace wins.
            await self._collection.replace_one({"_id": state.id}, document)

    async def delete_for_rule(self, rule: str) -> None:
        await self._collection.delete_many({"rule": rule})

    def to_document(self, state: RuleState) -> Document:
        return {
            "_id": state.id,
            "rule": state.rule,
            "device": state.device,
            "organization": state.organization,
            "violating_since": state.violating_since,
            "last_time": state.last_time,
            "active_alert": state.active_alert,
        }

    def from_document(self, document: Document) -> RuleState:
        return RuleState(
            rule=document["rule"],
            device=document["device"],
            organization=document["organization"],
            violating_since=document.get("violating_since"),
            last_time=document.get("last_time"),
            active_alert=document.get("active_alert", ""),
        )
