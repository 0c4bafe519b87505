"""The only code that touches the patient service's database, the one place PHI is stored."""

from __future__ import annotations

from datetime import date

from medmesh.runtime.mongo import Document, create_query_index
from medmesh.runtime.resources import MongoRepository
from services.patient.domain import Contact, Patient, Sex


class PatientRepository(MongoRepository[Patient]):
    collection_name = "patients"
    resource_label = "patient"

    async def ensure_indexes(self) -> None:
        # Listing is by organization in `_id` order; `devices = "devices/X"` finds a device's patient.
        await create_query_index(self._collection, [("organization", 1), ("_id", 1)])
        await create_query_index(self._collection, [("devices", 1), ("_id", 1)])

    def to_document(self, resource: Patient) -> Document:
        return {
            "_id": resource.id,
            "organization": resource.organization,
            "given_name": resource.given_name,
            "family_name": resource.family_name,
            # BSON has no calendar date; an ISO date string keeps it exact (no time zone to shift it).
            "birth_date": resource.birth_date.isoformat() if resource.birth_date else None,
            "sex": resource.sex.value if resource.sex else None,
            "contact": {
                "email": resource.contact.email,
                "phone": resource.contact.phone,
                "address": resource.contact.address,
            },
            "national_id": resource.national_id,
            "devices": list(resource.devices),
            "create_time": resource.create_time,
            "update_time": resource.update_time,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> Patient:
        contact = document.get("contact") or {}
        birth_date = document.get("birth_date")
        sex = document.get("sex")
        return Patient(
            id=document["_id"],
            organization=document["organization"],
            given_name=document.get("given_name", ""),
            family_name=document.get("family_name", ""),
            birth_date=date.fromisoformat(birth_date) if birth_date else None,
            sex=Sex(sex) if sex else None,
            contact=Contact(contact.get("email", ""), contact.get("phone", ""), contact.get("address", "")),
            national_id=document.get("national_id", ""),
            devices=tuple(document.get("devices", ())),
            create_time=document["create_time"],
            update_time=document["update_time"],
            revision=document["revision"],
        )
