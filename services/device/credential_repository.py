"""The only code that touches the device service's certificate and temporary-credential collections.

What the MQTT adapter asks on every connect is read by `_id` alone (see `repository.py` for
why): a certificate by its serial, a certificate's serial by its fingerprint, a revocation by
the serial, a temporary credential by its username.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from medmesh.runtime.mongo import Document, create_query_index
from medmesh.runtime.resources import MongoRepository
from services.device.certificates import DeviceCertificate, Revocation, RevocationReason
from services.device.credentials import TemporaryCredential
from services.device.repository import run_once


class CertificateRepository(MongoRepository[DeviceCertificate]):
    """Issued certificates, `_id` = serial; never changed after the insert (revocations live apart).
    Beside them, `device_certificate_fingerprints` maps each certificate's SHA-256 fingerprint
    (`_id`) to its serial."""

    collection_name = "device_certificates"
    resource_label = "certificate"

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        super().__init__(database)
        self._database = database
        self._fingerprints = database["device_certificate_fingerprints"]

    async def ensure_indexes(self) -> None:
        # A device's certificates in serial order; listing by fingerprint.
        await create_query_index(self._collection, [("device_id", 1), ("device_registration", 1), ("_id", 1)])
        await self._collection.create_index("sha256_fingerprint", unique=True)
        await run_once(self._database, "device-certificate-fingerprints", self._index_fingerprints)

    async def insert(self, resource: DeviceCertificate) -> None:
        await super().insert(resource)
        await self._index_fingerprint(resource.sha256_fingerprint, resource.id)

    async def find_by_fingerprint(self, fingerprint: str) -> DeviceCertificate | None:
        entry = await self._fingerprints.find_one({"_id": fingerprint})
        if entry is None:
            return None
        certificate = await self.get(entry["serial"])
        # A serial is the certificate's only once it was inserted under it.
        if certificate is None or certificate.sha256_fingerprint != fingerprint:
            return None
        return certificate

    async def _index_fingerprint(self, fingerprint: str, serial: str) -> None:
        # Indexed already, when it exists: a fingerprint is one certificate's (it covers the serial).
        with contextlib.suppress(DuplicateKeyError):
            await self._fingerprints.insert_one({"_id": fingerprint, "serial": serial})

    async def _index_fingerprints(self) -> None:
        """Certificates issued before the fingerprint index existed (a scan, once)."""
        async for document in self._collection.find({}, {"sha256_fingerprint": 1}):
            await self._index_fingerprint(document["sha256_fingerprint"], document["_id"])

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
