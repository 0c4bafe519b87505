"""Temporary credentials: how a phone or gateway relays a device that cannot reach the broker itself.

A signed-in user with access to the device (a member of its owner or care organization, a platform
admin, or the patient it is assigned to) gets a username and password for the MQTT broker, valid
for that one device and a short time (15 minutes unless asked otherwise, at most 24 hours). The
relay connects with client id = the device id; the adapter asks `verify` and admits it only for
that device.

The password is 32 random bytes and is stored only as its SHA-256: with that much entropy a slow
password hash would add nothing, and every connect would pay for it. The username is not secret.

FerretDB has no TTL indexes: an expired credential is refused because `verify` compares its
expiry with the clock, and `sweep_expired` (run periodically by `run_sweeper`) deletes the ones
past it, so the collection does not grow.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import Role, current_principal
from medmesh.runtime.errors import InvalidArgument
from medmesh.runtime.resources import now
from medmesh.runtime.tasks import stop_requested
from services.device.certificates import Clock, DeviceRegistry, authorize_device, require_internal
from services.device.domain import NAME_PREFIX
from services.device.domain import parse_name as parse_device_name

log = logging.getLogger(__name__)

USERNAME_PREFIX = "tc-"
USERNAME_PATTERN = re.compile(r"^tc-[0-9a-f]{32}$")
PASSWORD_BYTES = 32
DEFAULT_TTL = timedelta(minutes=15)
MIN_TTL = timedelta(minutes=1)
MAX_TTL = timedelta(hours=24)
SWEEP_INTERVAL_SECONDS = 300.0

# Anyone who may see the device; a patient only for the device assigned to them (the phone-app case).
CREDENTIAL_ROLES = (Role.PLATFORM_ADMIN, Role.ORGANIZATION_ADMIN, Role.OPERATOR, Role.CLINICIAN, Role.PATIENT)


@dataclass(frozen=True)
class TemporaryCredential:
    """What is stored: never the password."""

    id: str  # the username
    device_id: str
    device_registration: str  # `DeviceAssignment.registration` at issue
    password_sha256: str
    expire_time: datetime
    create_time: datetime
    created_by: str  # the subject who asked for them
    revision: int = 1

    @property
    def device(self) -> str:
        return NAME_PREFIX + self.device_id


@dataclass(frozen=True)
class IssuedCredentials:
    """What the caller gets, once."""

    device: str
    username: str
    password: str
    expire_time: datetime

    def __repr__(self) -> str:
        return (
            f"IssuedCredentials(device={self.device!r}, username={self.username!r}, expire_time={self.expire_time!r})"
        )


class VerifyFailure(StrEnum):
    UNKNOWN = "UNKNOWN"  # no such username, or the wrong password
    EXPIRED = "EXPIRED"
    DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"


@dataclass(frozen=True)
class CredentialCheck:
    """`device` and `expire_time` are set only when valid."""

    failure: VerifyFailure | None
    device: str = ""
    expire_time: datetime | None = None

    @property
    def valid(self) -> bool:
        return self.failure is None


class TemporaryCredentialStore(Protocol):
    async def insert(self, resource: TemporaryCredential) -> None: ...
    async def get(self, resource_id: str) -> TemporaryCredential | None: ...
    async def delete_expired(self, before: datetime) -> int:
        """Deletes the credentials that expired before `before`; returns how many."""


def password_hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def require_ttl(ttl: timedelta | None, field: str = "ttl") -> timedelta:
    if ttl is None:
        return DEFAULT_TTL
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidArgument.for_field(field, "must be between one minute and 24 hours", reason="INVALID_TTL")
    return ttl


class TemporaryCredentialService:
    def __init__(
        self, registry: DeviceRegistry, store: TemporaryCredentialStore, trail: AuditTrail, clock: Clock = now
    ) -> None:
        self._registry = registry
        self._store = store
        self._trail = trail
        self._clock = clock

    async def create(self, device: str, ttl: timedelta | None = None) -> IssuedCredentials:
        principal = current_principal()
        assignment = await authorize_device(
            self._registry, principal, device, roles=CREDENTIAL_ROLES, action="obtain temporary device credentials"
        )
        lifetime = require_ttl(ttl)
        at = self._clock()
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        credential = TemporaryCredential(
            id=USERNAME_PREFIX + secrets.token_hex(16),
            device_id=parse_device_name(assignment.device),
            device_registration=assignment.registration,
            password_sha256=password_hash(password),
            expire_time=at + lifetime,
            create_time=at,
            created_by=principal.subject,
        )
        await self._store.insert(credential)
        # What they relay belongs to the data organization, so its admins see who could relay it.
        await audit(
            self._trail,
            assignment.data_organization,
            assignment.device,
            description=(
                f"temporary credentials {credential.id} issued, expire {credential.expire_time:%Y-%m-%dT%H:%M:%SZ}"
            ),
        )
        return IssuedCredentials(assignment.device, credential.id, password, credential.expire_time)

    async def verify(self, username: str, password: str) -> CredentialCheck:
        require_internal(current_principal(), "verify temporary device credentials")
        if not USERNAME_PATTERN.match(username):
            return CredentialCheck(VerifyFailure.UNKNOWN)
        credential = await self._store.get(username)
        if credential is None or not hmac.compare_digest(password_hash(password), credential.password_sha256):
            return CredentialCheck(VerifyFailure.UNKNOWN)
        if self._clock() >= credential.expire_time:
            return CredentialCheck(VerifyFailure.EXPIRED)
        assignment = await self._registry.get_assignment(credential.device)
        # A serial deleted and registered again is another device as far as credentials go.
        if assignment is None or assignment.registration != credential.device_registration:
            return CredentialCheck(VerifyFailure.DEVICE_NOT_FOUND)
        return CredentialCheck(None, credential.device, credential.expire_time)

    async def sweep_expired(self) -> int:
        """Deletes every expired credential (they are already refused); safe to run on every replica.

        Not audited: it removes only what can no longer be used, and acts for no caller.
        """
        return await self._store.delete_expired(self._clock())

    async def run_sweeper(self, interval_seconds: float = SWEEP_INTERVAL_SECONDS) -> None:
        """Sweeps every `interval_seconds` until cancelled; a failed sweep is logged and retried."""
        while not stop_requested():
            try:
                swept = await self.sweep_expired()
                if swept:
                    log.info("deleted %d expired temporary device credentials", swept)
            except Exception as error:  # the database may be down for a while: try again next round
                log.warning("sweeping expired temporary device credentials failed: %r", error)
            await asyncio.sleep(interval_seconds)
