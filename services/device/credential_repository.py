"""The only code that touches the device service's certificate and temporary-credential collections."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from medmesh.runtime.mongo import Document, create_query_index
from medmesh.runtime.resources import MongoRepository
from services.device.certificates import DeviceCertificate, Revocation, RevocationReason
from services.device.credentials import TemporaryCredential


class CertificateRepository(MongoRepository[DeviceCertificate]):
    """Issued certificates, `_id` = serial; never changed after the insert (revocations live apart)."""

    collection_name = "device_certificates"
    resource_label = "certificate"

    async def ensure_indexes(self) -> None:
        # A device's certificates in serial order; the adapter's lookup by fingerprint.
        await create_query_index(self._collection, [("device_id", 1), ("device_registration", 1), ("_id", 1)])
        await self._collection.create_index("sha256_fingerprint", unique=True)

    async def find_by_fingerprint(self, fingerprint: str) -> DeviceCertificate | None:
        document = await self._collection.find_one({"sha256_fingerprint": fingerprint})
        return None if document is None else self.from_document(document)

    def to_document(self, resource: DeviceCertificate) -> Document:
        return {
            "_id": resource.id,
            "device_id": resource.device_id,
            "device_registration": resource.device_registration,
            "pem": resource.pem,
            "sha256_fingerprint": resource.sha256_fingerprint,
            "subject": resource.subject,
            "key_type": resource.key_type,
            "not_before": resource.not_before,
            "not_after": resource.not_after,
            "create_time": resource.create_time,
            "issued_by": resource.issued_by,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> DeviceCertificate:
        return DeviceCertificate(
            id=document["_id"],
            device_id=document["device_id"],
            device_registration=document.get("device_registration", ""),
            pem=document["pem"],
            sha256_fingerprint=document["sha256_fingerprint"],
            subject=document["subject"],
            key_type=document["key_type"],
            not_before=document["not_before"],
            not_after=document["not_after"],
            create_time=document["create_time"],
            issued_by=document.get("issued_by", ""),
            revision=document.get("revision", 1),
        )


class RevocationRepository(MongoRepository[Revocation]):
    """One document per revoked certificate, `_id` = serial: the unique insert decides a revocation race."""

    collection_name = "device_certificate_revocations"
    resource_label = "revocation"

    async def get_many(self, serials: Sequence[str]) -> dict[str, Revocation]:
        cursor = self._collection.find({"_id": {"$in": list(serials)}})
        revocations = [self.from_document(document) async for document in cursor]
        return {revocation.id: revocation for revocation in revocations}

    def to_document(self, resource: Revocation) -> Document:
        return {
            "_id": resource.id,
            "device_id": resource.device_id,
            "revoke_time": resource.revoke_time,
            "reason": resource.reason.value,
            "revoked_by": resource.revoked_by,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> Revocation:
        return Revocation(
            id=document["_id"],
            device_id=document["device_id"],
            revoke_time=document["revoke_time"],
            reason=RevocationReason(document["reason"]),
            revoked_by=document.get("revoked_by", ""),
            revision=document.get("revision", 1),
        )


class TemporaryCredentialRepository(MongoRepository[TemporaryCredential]):
    """Temporary credentials, `_id` = username; the password only as SHA-256."""

    collection_name = "device_temporary_credentials"
    resource_label = "temporary_credential"

    async def ensure_indexes(self) -> None:
        # The sweep deletes by expiry (FerretDB has no TTL indexes to do it).
        await create_query_index(self._collection, [("expire_time", 1)])

    async def delete_expired(self, before: datetime) -> int:
        result = await self._collection.delete_many({"expire_time": {"$lt": before}})
        return result.deleted_count

    def to_document(self, resource: TemporaryCredential) -> Document:
        return {
            "_id": resource.id,
            "device_id": resource.device_id,
            "device_registration": resource.device_registration,
            "password_sha256": resource.password_sha256,
            "expire_time": resource.expire_time,
            "create_time": resource.create_time,
            "created_by": resource.created_by,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> TemporaryCredential:
        return TemporaryCredential(
            id=document["_id"],
            device_id=document["device_id"],
            device_registration=document.get("device_registration", ""),
            password_sha256=document["password_sha256"],
            expire_time=document["expire_time"],
            create_time=document["create_time"],
            created_by=document.get("created_by", ""),
            revision=document.get("revision", 1),
        )
