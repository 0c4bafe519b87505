"""What the identity use cases need of their storage and of other services; the Mongo
repositories and gRPC clients provide it, and the unit tests' in-memory fakes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from medmesh.runtime.resources import ResourceStore
from services.identity.domain import LoginFailures, RefreshToken, ServiceAccountKey, SigningKey, User


class UserStore(ResourceStore[User], Protocol):
    async def get_by_username(self, username: str) -> User | None:
        """The user with this (lower-cased) username."""


class ServiceAccountKeyStore(ResourceStore[ServiceAccountKey], Protocol):
    async def delete_for_service_account(self, service_account: str) -> int:
        """Deletes every key of a service account; how many there were."""


class RefreshTokenStore(Protocol):
    async def insert(self, token: RefreshToken) -> None: ...
    async def get(self, token_id: str) -> RefreshToken | None: ...

    async def mark_used(self, token_id: str) -> bool:
        """Marks an unused, unrevoked token used; False if it already was (or was revoked)."""

    async def revoke_family(self, family: str) -> None: ...
    async def revoke_subject(self, subject: str) -> None: ...

    async def purge_expired(self, before: datetime) -> int:
        """Deletes tokens that expired before `before`; how many."""


class LoginFailureStore(Protocol):
    async def get(self, username: str) -> LoginFailures | None: ...

    async def record_failure(self, username: str, at: datetime) -> LoginFailures:
        """Counts one more consecutive failure, atomically; the state after it."""

    async def reset(self, username: str) -> None: ...

    async def purge(self, last_failure_before: datetime) -> int:
        """Forgets failures older than any lock; how many."""


class SigningKeyStore(Protocol):
    async def insert(self, key: SigningKey) -> None: ...
    async def list_all(self) -> list[SigningKey]: ...
    async def delete(self, kids: Sequence[str]) -> int: ...


class PatientDirectory(Protocol):
    async def exists(self, patient: str) -> bool:
        """Whether the patient record exists (and the caller may see it)."""
