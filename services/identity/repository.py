"""The only code that touches the identity service's database."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from medmesh.runtime.auth import Role
from medmesh.runtime.errors import AlreadyExists
from medmesh.runtime.mongo import Document, create_query_index
from medmesh.runtime.resources import MongoRepository
from services.identity.domain import (
    LoginFailures,
    RefreshToken,
    ServiceAccount,
    ServiceAccountKey,
    SigningKey,
    User,
)


class UserRepository(MongoRepository[User]):
    collection_name = "users"
    resource_label = "user"

    async def ensure_indexes(self) -> None:
        # Usernames are unique across the platform; the service stores them lower-cased.
        await self._collection.create_index([("username", 1)], unique=True)
        await create_query_index(self._collection, [("organization", 1), ("_id", 1)])
        await create_query_index(self._collection, [("organization", 1), ("role", 1), ("_id", 1)])

    async def insert(self, resource: User) -> None:
        try:
            await self._collection.insert_one(self.to_document(resource))
        except DuplicateKeyError as error:
            if await self._collection.find_one({"_id": resource.id}, {"_id": 1}) is not None:
                raise AlreadyExists(
                    f"user {resource.id!r} already exists",
                    reason="USER_ALREADY_EXISTS",
                    metadata={"user": resource.id},
                ) from error
            raise AlreadyExists(
                "this username is taken", reason="USERNAME_ALREADY_EXISTS", metadata={"username": resource.username}
            ) from error

    async def get_by_username(self, username: str) -> User | None:
        document = await self._collection.find_one({"username": username})
        return None if document is None else self.from_document(document)

    def to_document(self, resource: User) -> Document:
        return {
            "_id": resource.id,
            "organization": resource.organization,
            "username": resource.username,
            "display_name": resource.display_name,
            "role": resource.role.value,
            "patient": resource.patient,
            "disabled": resource.disabled,
            "password_hash": resource.password_hash,
            "create_time": resource.create_time,
            "update_time": resource.update_time,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> User:
        return User(
            id=document["_id"],
            organization=document["organization"],
            username=document["username"],
            display_name=document["display_name"],
            role=Role(document["role"]),
            password_hash=document["password_hash"],
            create_time=document["create_time"],
            update_time=document["update_time"],
            patient=document["patient"],
            disabled=document["disabled"],
            revision=document["revision"],
        )


class ServiceAccountRepository(MongoRepository[ServiceAccount]):
    collection_name = "service_accounts"
    resource_label = "service_account"

    async def ensure_indexes(self) -> None:
        await create_query_index(self._collection, [("organization", 1), ("_id", 1)])

    def to_document(self, resource: ServiceAccount) -> Document:
        return {
            "_id": resource.id,
            "organization": resource.organization,
            "display_name": resource.display_name,
            "role": resource.role.value,
            "create_time": resource.create_time,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> ServiceAccount:
        return ServiceAccount(
            id=document["_id"],
            organization=document["organization"],
            display_name=document["display_name"],
            role=Role(document["role"]),
            create_time=document["create_time"],
            revision=document["revision"],
        )


class ServiceAccountKeyRepository(MongoRepository[ServiceAccountKey]):
    collection_name = "service_account_keys"
    resource_label = "service_account_key"

    async def ensure_indexes(self) -> None:
        await create_query_index(self._collection, [("service_account", 1), ("_id", 1)])

    async def delete_for_service_account(self, service_account: str) -> int:
        result = await self._collection.delete_many({"service_account": service_account})
        return result.deleted_count

    def to_document(self, resource: ServiceAccountKey) -> Document:
        return {
            "_id": resource.id,
            "service_account": resource.service_account,
            "organization": resource.organization,
            "secret_hash": resource.secret_hash,
            "create_time": resource.create_time,
            "expire_time": resource.expire_time,
            "revision": resource.revision,
        }

    def from_document(self, document: Document) -> ServiceAccountKey:
        return ServiceAccountKey(
            id=document["_id"],
            service_account=document["service_account"],
            organization=document["organization"],
            secret_hash=document["secret_hash"],
            create_time=document["create_time"],
            expire_time=document.get("expire_time"),
            revision=document["revision"],
        )


class RefreshTokenRepository:
    """Refresh tokens, one document each; `used` and `revoked` only ever go from false to true.

    "Used once" is decided by inserting a document keyed by the token id into
    `refresh_token_uses`: a unique insert is atomic in MongoDB and in FerretDB alike, whereas a
    conditional update (`used: false` -> true) is not atomic in FerretDB v1, where concurrent
    updates can all report a match (measured: up to 10 of 10).
    """

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._collection = database["refresh_tokens"]
        self._uses = database["refresh_token_uses"]

    async def ensure_indexes(self) -> None:
        await create_query_index(self._collection, [("family", 1)])
        await create_query_index(self._collection, [("subject", 1)])
        await create_query_index(self._collection, [("expire_time", 1)])
        await create_query_index(self._uses, [("expire_time", 1)])

    async def insert(self, token: RefreshToken) -> None:
        await self._collection.insert_one(
            {
                "_id": token.id,
                "family": token.family,
                "subject": token.subject,
                "organization": token.organization,
                "secret_hash": token.secret_hash,
                "create_time": token.create_time,
                "expire_time": token.expire_time,
                "used": token.used,
                "revoked": token.revoked,
            }
        )

    async def get(self, token_id: str) -> RefreshToken | None:
        document = await self._collection.find_one({"_id": token_id})
        if document is None:
            return None
        return RefreshToken(
            id=document["_id"],
            family=document["family"],
            subject=document["subject"],
            organization=document["organization"],
            secret_hash=document["secret_hash"],
            create_time=document["create_time"],
            expire_time=document["expire_time"],
            used=document["used"],
            revoked=document["revoked"],
        )

    async def mark_used(self, token_id: str) -> bool:
        document = await self._collection.find_one({"_id": token_id}, {"expire_time": 1, "revoked": 1})
        if document is None or document["revoked"]:
            return False
        try:
            # Of two concurrent refreshes with the same token exactly one inserts.
            await self._uses.insert_one({"_id": token_id, "expire_time": document["expire_time"]})
        except DuplicateKeyError:
            return False
        # For readers (and the fast path of the next presentation); the insert above decided.
        await self._collection.update_one({"_id": token_id}, {"$set": {"used": True}})
        return True

    async def revoke_family(self, family: str) -> None:
        await self._collection.update_many({"family": family, "revoked": False}, {"$set": {"revoked": True}})

    async def revoke_subject(self, subject: str) -> None:
        await self._collection.update_many({"subject": subject, "revoked": False}, {"$set": {"revoked": True}})

    async def purge_expired(self, before: datetime) -> int:
        # FerretDB has no TTL indexes, so the service deletes them itself.
        await self._uses.delete_many({"expire_time": {"$lt": before}})
        result = await self._collection.delete_many({"expire_time": {"$lt": before}})
        return result.deleted_count


class LoginFailureRepository:
    """Failed logins per lower-cased username (existing or not), one document per failure.

    Counting inserted documents rather than `$inc`-ing a counter: FerretDB v1 loses concurrent
    increments (measured: 3 of 20 counted), and a password-guessing attack is exactly a burst of
    concurrent failures. A success deletes them all.
    """

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._collection = database["login_failures"]

    async def ensure_indexes(self) -> None:
        await create_query_index(self._collection, [("username", 1), ("time", -1)])
        await create_query_index(self._collection, [("time", 1)])

    async def get(self, username: str) -> LoginFailures | None:
        latest = await self._collection.find_one({"username": username}, sort=[("time", -1)])
        if latest is None:
            return None
        failures = await self._collection.count_documents({"username": username})
        return LoginFailures(username, max(failures, 1), latest["time"])

    async def record_failure(self, username: str, at: datetime) -> LoginFailures:
        await self._collection.insert_one({"_id": uuid.uuid4().hex, "username": username, "time": at})
        state = await self.get(username)
        # A success may have reset the count in between: this failure then starts a new one.
        return state or LoginFailures(username, 1, at)

    async def reset(self, username: str) -> None:
        await self._collection.delete_many({"username": username})

    async def purge(self, last_failure_before: datetime) -> int:
        result = await self._collection.delete_many({"time": {"$lt": last_failure_before}})
        return result.deleted_count


class SigningKeyRepository:
    """Token signing keys (private keys included): the most sensitive collection of the service."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._collection = database["signing_keys"]

    async def ensure_indexes(self) -> None:
        await create_query_index(self._collection, [("activate_time", 1)])

    async def insert(self, key: SigningKey) -> None:
        await self._collection.insert_one(
            {
                "_id": key.kid,
                "kid": key.kid,
                "private_key_pem": key.private_key_pem,
                "public_jwk": dict(key.public_jwk),
                "create_time": key.create_time,
                "activate_time": key.activate_time,
            }
        )

    async def list_all(self) -> list[SigningKey]:
        cursor = self._collection.find({}).sort([("activate_time", 1), ("_id", 1)])
        return [
            SigningKey(
                kid=document["_id"],
                private_key_pem=document["private_key_pem"],
                public_jwk=dict(document["public_jwk"]),
                create_time=document["create_time"],
                activate_time=document["activate_time"],
            )
            async for document in cursor
        ]

    async def delete(self, kids: Sequence[str]) -> int:
        if not kids:
            return 0
        result = await self._collection.delete_many({"_id": {"$in": list(kids)}})
        return result.deleted_count
