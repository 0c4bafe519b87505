"""Users, service accounts and their keys, refresh tokens, login back-off and the signing-key
schedule. Plain Python, no I/O."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import re
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from medmesh.runtime.auth import Role
from medmesh.runtime.errors import InvalidArgument
from medmesh.runtime.resources import etag_of

ORGANIZATION_PREFIX = "organizations/"
_SEGMENT = r"[a-z0-9-]{1,63}"
_ORGANIZATION = rf"organizations/{_SEGMENT}"
ORGANIZATION_NAME = re.compile(rf"^{_ORGANIZATION}$")
USER_NAME = re.compile(rf"^({_ORGANIZATION})/users/({_SEGMENT})$")
SERVICE_ACCOUNT_NAME = re.compile(rf"^({_ORGANIZATION})/serviceAccounts/({_SEGMENT})$")
SERVICE_ACCOUNT_KEY_NAME = re.compile(rf"^(({_ORGANIZATION})/serviceAccounts/{_SEGMENT})/keys/({_SEGMENT})$")
PATIENT_NAME = re.compile(rf"^({_ORGANIZATION})/patients/({_SEGMENT})$")
CHOSEN_ID = re.compile(r"^[a-z][a-z0-9-]{2,62}$")

USER_UPDATABLE_FIELDS = ("display_name", "role", "patient", "disabled")
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
MAX_USERNAME_LENGTH = 254
MAX_DISPLAY_NAME_LENGTH = 200
MAX_KEYS_PER_SERVICE_ACCOUNT = 10

# Failed-login back-off: the 5th consecutive failure locks for 30 s, each further one doubles
# the lock, up to 15 minutes.
FAILURES_BEFORE_LOCK = 5
FIRST_LOCK_SECONDS = 30
MAX_LOCK_SECONDS = 15 * 60

# A retired signing key stays published this long past the expiry of the last token it can
# have signed: covers clock skew and instances whose cached key list is a few seconds old.
RETIRED_KEY_GRACE = timedelta(seconds=60)


# --- names ------------------------------------------------------------------------------------


def _invalid_name(field_name: str, expected: str, value: str) -> InvalidArgument:
    return InvalidArgument.for_field(field_name, f"must look like {expected}, got {value!r}", reason="INVALID_NAME")


def parse_organization(value: str, field_name: str = "parent") -> str:
    """Validates `organizations/{o}` and returns it."""
    if not ORGANIZATION_NAME.match(value):
        raise _invalid_name(field_name, "organizations/{organization}", value)
    return value


def parse_user_name(name: str, field_name: str = "name") -> str:
    """`organizations/{o}/users/{u}` -> its organization."""
    match = USER_NAME.match(name)
    if not match:
        raise _invalid_name(field_name, "organizations/{organization}/users/{user}", name)
    return match.group(1)


def parse_service_account_name(name: str, field_name: str = "name") -> str:
    """`organizations/{o}/serviceAccounts/{s}` -> its organization."""
    match = SERVICE_ACCOUNT_NAME.match(name)
    if not match:
        raise _invalid_name(field_name, "organizations/{organization}/serviceAccounts/{service_account}", name)
    return match.group(1)


def parse_service_account_key_name(name: str, field_name: str = "name") -> tuple[str, str, str]:
    """`organizations/{o}/serviceAccounts/{s}/keys/{k}` -> (organization, service account, key id)."""
    match = SERVICE_ACCOUNT_KEY_NAME.match(name)
    if not match:
        raise _invalid_name(
            field_name, "organizations/{organization}/serviceAccounts/{service_account}/keys/{key}", name
        )
    return match.group(2), match.group(1), match.group(3)


def child_id(chosen: str, field_name: str) -> str:
    """The id a caller chose (AIP-133), or a generated one."""
    if not chosen:
        return uuid.uuid4().hex
    if not CHOSEN_ID.match(chosen):
        raise InvalidArgument.for_field(
            field_name, "3 to 63 lower-case letters, digits or hyphens, starting with a letter", reason="INVALID_ID"
        )
    return chosen


# --- field rules ------------------------------------------------------------------------------


def normalize_username(value: str, field_name: str = "user.username") -> str:
    """Usernames are unique case-insensitively, so they are kept lower-cased."""
    username = value.strip().lower()
    if not username:
        raise InvalidArgument.for_field(field_name, "is required", reason="REQUIRED_FIELD")
    if len(username) > MAX_USERNAME_LENGTH:
        raise InvalidArgument.for_field(field_name, f"at most {MAX_USERNAME_LENGTH} characters")
    if any(c.isspace() or not c.isprintable() for c in username):
        raise InvalidArgument.for_field(field_name, "must not contain spaces or control characters")
    return username


def require_display_name(value: str, field_name: str, *, required: bool = False) -> str:
    value = value.strip()
    if required and not value:
        raise InvalidArgument.for_field(field_name, "is required", reason="REQUIRED_FIELD")
    if len(value) > MAX_DISPLAY_NAME_LENGTH:
        raise InvalidArgument.for_field(field_name, f"at most {MAX_DISPLAY_NAME_LENGTH} characters")
    return value


def require_password(value: str, field_name: str) -> str:
    if not MIN_PASSWORD_LENGTH <= len(value) <= MAX_PASSWORD_LENGTH:
        raise InvalidArgument.for_field(
            field_name,
            f"must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters",
            reason="PASSWORD_TOO_WEAK" if len(value) < MIN_PASSWORD_LENGTH else "INVALID_FIELD",
        )
    return value


def require_role(role: Role | None, field_name: str) -> Role:
    if role is None:
        raise InvalidArgument.for_field(field_name, "is required (not ROLE_UNSPECIFIED)", reason="REQUIRED_FIELD")
    return role


def check_role_in_organization(role: Role, organization: str, manufacturer: str, field_name: str) -> None:
    """Platform administrators are the manufacturer's staff: the role exists only there."""
    if role is Role.PLATFORM_ADMIN and organization != manufacturer:
        raise InvalidArgument.for_field(
            field_name,
            f"ROLE_PLATFORM_ADMIN exists only in {manufacturer}",
            reason="ROLE_NOT_ALLOWED_IN_ORGANIZATION",
        )


def check_patient_link(role: Role, patient: str, organization: str, field_name: str) -> str:
    """A patient user names their own patient record in the same organization; nobody else names one."""
    patient = patient.strip()
    if role is not Role.PATIENT:
        if patient:
            raise InvalidArgument.for_field(
                field_name, "only ROLE_PATIENT users name a patient", reason="INVALID_FIELD"
            )
        return ""
    if not patient:
        raise InvalidArgument.for_field(field_name, "is required for ROLE_PATIENT", reason="REQUIRED_FIELD")
    match = PATIENT_NAME.match(patient)
    if not match:
        raise _invalid_name(field_name, "organizations/{organization}/patients/{patient}", patient)
    if match.group(1) != organization:
        raise InvalidArgument.for_field(
            field_name, f"must be a patient of {organization}", reason="PATIENT_IN_OTHER_ORGANIZATION"
        )
    return patient


# --- users and service accounts ----------------------------------------------------------------


@dataclass(frozen=True)
class User:
    id: str  # the resource name, organizations/{o}/users/{u}: the unique storage key
    organization: str
    username: str  # lower-cased
    display_name: str
    role: Role
    password_hash: str = field(repr=False)
    create_time: datetime
    update_time: datetime
    patient: str = ""
    disabled: bool = False
    revision: int = 1

    @property
    def name(self) -> str:
        return self.id

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)

    def updated(self, changes: UserChanges, fields: set[str], at: datetime) -> User:
        """The user with the masked fields changed; the caller checks the result's role rules."""
        values: dict[str, Any] = {}
        if "display_name" in fields:
            values["display_name"] = require_display_name(changes.display_name, "user.display_name")
        if "role" in fields:
            values["role"] = require_role(changes.role, "user.role")
        if "disabled" in fields:
            values["disabled"] = changes.disabled
        if "patient" in fields:
            values["patient"] = changes.patient.strip()
        elif values.get("role", self.role) is not Role.PATIENT:
            # Leaving ROLE_PATIENT drops the link to the patient record.
            values["patient"] = ""
        return replace(self, **values, update_time=at, revision=self.revision + 1)

    def with_password_hash(self, password_hash: str, at: datetime) -> User:
        return replace(self, password_hash=password_hash, update_time=at, revision=self.revision + 1)


@dataclass(frozen=True)
class UserChanges:
    """New values for an update; only the fields in the update mask are applied."""

    display_name: str = ""
    role: Role | None = None
    patient: str = ""
    disabled: bool = False


@dataclass(frozen=True)
class ServiceAccount:
    id: str  # the resource name, organizations/{o}/serviceAccounts/{s}
    organization: str
    display_name: str
    role: Role
    create_time: datetime
    revision: int = 1

    @property
    def name(self) -> str:
        return self.id

    @property
    def etag(self) -> str:
        return etag_of(self.id, self.revision)


@dataclass(frozen=True)
class ServiceAccountKey:
    id: str  # the key id: also the part of the secret before the dot
    service_account: str
    organization: str
    secret_hash: str = field(repr=False)
    create_time: datetime
    expire_time: datetime | None = None
    revision: int = 1

    @property
    def name(self) -> str:
        return f"{self.service_account}/keys/{self.id}"

    def expired(self, at: datetime) -> bool:
        return self.expire_time is not None and self.expire_time <= at


# --- opaque credentials ---------------------------------------------------------------------------


def hash_secret(secret: str) -> str:
    """Secrets are 256 random bits, so a plain SHA-256 is as good as a slow hash here."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_hash)


def new_credential(identifier: str) -> tuple[str, str]:
    """(`{identifier}.{secret}` for the holder, the hash to store)."""
    secret = secrets.token_urlsafe(32)
    return f"{identifier}.{secret}", hash_secret(secret)


def split_credential(value: str) -> tuple[str, str] | None:
    """`{identifier}.{secret}` -> (identifier, secret); None when it cannot be one of ours."""
    identifier, dot, secret = value.strip().partition(".")
    if not dot or not identifier or not secret or len(identifier) > 63:
        return None
    return identifier, secret


def new_identifier() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RefreshToken:
    """One refresh token of a family (the login it descends from). Only the secret's hash is kept."""

    id: str
    family: str
    subject: str  # the user's resource name
    organization: str
    secret_hash: str = field(repr=False)
    create_time: datetime
    expire_time: datetime
    used: bool = False
    revoked: bool = False

    def expired(self, at: datetime) -> bool:
        return self.expire_time <= at


@dataclass(frozen=True)
class TokenGrant:
    """What Login and RefreshToken answer."""

    access_token: str = field(repr=False)
    expires_in: int
    refresh_token: str = field(default="", repr=False)
    refresh_expires_in: int = 0


# --- failed-login back-off ----------------------------------------------------------------------


def lock_duration(failures: int) -> timedelta:
    if failures < FAILURES_BEFORE_LOCK:
        return timedelta(0)
    # Exponent capped so huge counters cannot overflow; the cap is reached long before.
    seconds = FIRST_LOCK_SECONDS * 2 ** min(failures - FAILURES_BEFORE_LOCK, 16)
    return timedelta(seconds=min(seconds, MAX_LOCK_SECONDS))


@dataclass(frozen=True)
class LoginFailures:
    """Consecutive failed logins for one lower-cased username (existing or not)."""

    username: str
    failures: int
    last_failure_time: datetime

    @property
    def locked_until(self) -> datetime:
        return self.last_failure_time + lock_duration(self.failures)

    def retry_after_seconds(self, at: datetime) -> int:
        """Whole seconds until the next attempt is allowed; 0 when it is allowed now."""
        remaining = (self.locked_until - at).total_seconds()
        return max(0, math.ceil(remaining))


# --- signing keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key_pem: str = field(repr=False)
    public_jwk: dict[str, str] = field(hash=False)
    create_time: datetime
    activate_time: datetime

    @property
    def order(self) -> tuple[datetime, str]:
        """Newer keys sort later; equal activation times are broken by the larger kid."""
        return self.activate_time, self.kid


@dataclass(frozen=True)
class KeySchedule:
    """Which key signs now, which are published, and which may be forgotten."""

    signing: SigningKey | None
    published: tuple[SigningKey, ...]  # newest first
    pending: tuple[SigningKey, ...]  # published but not yet signing
    retired: tuple[SigningKey, ...]  # no longer published: every token they signed has expired

    def published_kids(self) -> list[str]:
        return [key.kid for key in self.published]


def key_schedule(keys: Iterable[SigningKey], at: datetime, access_token_ttl: timedelta) -> KeySchedule:
    """The signing key is the newest active one. An older key signed until its successor
    activated, so it stays published until the last token it signed can have expired."""
    ordered = sorted(keys, key=lambda key: key.order)
    active = [key for key in ordered if key.activate_time <= at]
    pending = [key for key in ordered if key.activate_time > at]
    kept: list[SigningKey] = []
    retired: list[SigningKey] = []
    for older, successor in itertools.pairwise(active):
        still_verifying = at < successor.activate_time + access_token_ttl + RETIRED_KEY_GRACE
        (kept if still_verifying else retired).append(older)
    signing = active[-1] if active else None
    published = [*kept, *([signing] if signing else []), *pending]
    return KeySchedule(
        signing=signing,
        published=tuple(reversed(published)),
        pending=tuple(pending),
        retired=tuple(retired),
    )


def rotation_due(schedule: KeySchedule, at: datetime, period: timedelta) -> bool:
    """Rotate when the signing key is older than `period` and no successor is already waiting."""
    if schedule.signing is None or schedule.pending:
        return False
    return at - schedule.signing.activate_time >= period
