"""In-memory fakes of the identity service's ports, and a wired identity service to test against."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher

from medmesh.runtime.audit import RecordingAuditTrail
from medmesh.runtime.auth import Principal, Role, TokenSettings
from medmesh.runtime.errors import AlreadyExists, Unavailable
from services.identity.authentication import AuthenticationService
from services.identity.config import IdentitySettings
from services.identity.domain import LoginFailures, RefreshToken, ServiceAccount, ServiceAccountKey, SigningKey, User
from services.identity.passwords import Passwords
from services.identity.service import IdentityService
from services.identity.signing_keys import SigningKeyManager
from services.identity.tokens import TokenIssuer
from tests.unit.fakes import FakeOrganizationDirectory, InMemoryRepository

MANUFACTURER = "organizations/manufacturer"
ORG_A = "organizations/a"
ORG_B = "organizations/b"


def cheap_hasher() -> PasswordHasher:
    """argon2id with tiny costs: the same code paths, without 64 MiB and 0.2 s per hash."""
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class FakeClock:
    """A clock the test moves by hand. Starts a little in the past, so tokens issued at any
    moment a test reaches are still unexpired for the real-time checks of `TokenVerifier`."""

    def __init__(self, start: datetime | None = None) -> None:
        moment = start or datetime.now(UTC) - timedelta(minutes=5)
        self.now = moment.replace(microsecond=moment.microsecond // 1000 * 1000)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


class InMemoryUsers(InMemoryRepository[User]):
    """Also keeps usernames unique, like the unique index."""

    def __init__(self) -> None:
        super().__init__("user")

    async def insert(self, resource: User) -> None:
        if resource.id not in self.items and await self.get_by_username(resource.username) is not None:
            raise AlreadyExists("this username is taken", reason="USERNAME_ALREADY_EXISTS")
        await super().insert(resource)

    async def get_by_username(self, username: str) -> User | None:
        return next((u for u in self.items.values() if u.username == username), None)


class InMemoryServiceAccountKeys(InMemoryRepository[ServiceAccountKey]):
    def __init__(self) -> None:
        super().__init__("service_account_key")

    async def delete_for_service_account(self, service_account: str) -> int:
        doomed = [k for k, v in self.items.items() if v.service_account == service_account]
        for key in doomed:
            del self.items[key]
        return len(doomed)


class InMemoryRefreshTokens:
    def __init__(self) -> None:
        self.items: dict[str, RefreshToken] = {}
        self.lose_next_race = False  # plays a concurrent refresh that marks the token used first

    async def insert(self, token: RefreshToken) -> None:
        self.items[token.id] = token

    async def get(self, token_id: str) -> RefreshToken | None:
        return self.items.get(token_id)

    async def mark_used(self, token_id: str) -> bool:
        token = self.items.get(token_id)
        if self.lose_next_race and token is not None:
            self.lose_next_race = False
            self.items[token_id] = replace(token, used=True)
            return False
        if token is None or token.used or token.revoked:
            return False
        self.items[token_id] = replace(token, used=True)
        return True

    async def revoke_family(self, family: str) -> None:
        for key, token in list(self.items.items()):
            if token.family == family:
                self.items[key] = replace(token, revoked=True)

    async def revoke_subject(self, subject: str) -> None:
        for key, token in list(self.items.items()):
            if token.subject == subject:
                self.items[key] = replace(token, revoked=True)

    async def purge_expired(self, before: datetime) -> int:
        doomed = [k for k, t in self.items.items() if t.expire_time < before]
        for key in doomed:
            del self.items[key]
        return len(doomed)

    def live_for(self, subject: str) -> list[RefreshToken]:
        return [t for t in self.items.values() if t.subject == subject and not t.revoked]


class InMemoryLoginFailures:
    def __init__(self) -> None:
        self.items: dict[str, LoginFailures] = {}

    async def get(self, username: str) -> LoginFailures | None:
        return self.items.get(username)

    async def record_failure(self, username: str, at: datetime) -> LoginFailures:
        current = self.items.get(username)
        state = LoginFailures(username, (current.failures if current else 0) + 1, at)
        self.items[username] = state
        return state

    async def reset(self, username: str) -> None:
        self.items.pop(username, None)

    async def purge(self, last_failure_before: datetime) -> int:
        doomed = [k for k, v in self.items.items() if v.last_failure_time < last_failure_before]
        for key in doomed:
            del self.items[key]
        return len(doomed)


class InMemorySigningKeys:
    def __init__(self) -> None:
        self.items: dict[str, SigningKey] = {}
        self.lists = 0  # how often the manager read the store (for cache tests)

    async def insert(self, key: SigningKey) -> None:
        if key.kid in self.items:
            raise AlreadyExists(f"signing key {key.kid} exists")
        self.items[key.kid] = key

    async def list_all(self) -> list[SigningKey]:
        self.lists += 1
        return sorted(self.items.values(), key=lambda k: k.order)

    async def delete(self, kids: Sequence[str]) -> int:
        deleted = [kid for kid in kids if self.items.pop(kid, None) is not None]
        return len(deleted)


class FakePatientDirectory:
    def __init__(self, existing: Iterable[str] = (), *, unavailable: bool = False) -> None:
        self.existing = set(existing)
        self.unavailable = unavailable
        self.asked: list[str] = []

    async def exists(self, patient: str) -> bool:
        self.asked.append(patient)
        if self.unavailable:
            raise Unavailable(f"cannot check patient {patient!r}: UNAVAILABLE", reason="PATIENT_SERVICE_UNAVAILABLE")
        return patient in self.existing


@dataclass
class Identity:
    """The identity service wired to in-memory fakes."""

    clock: FakeClock
    settings: IdentitySettings
    token_settings: TokenSettings
    users: InMemoryUsers
    service_accounts: InMemoryRepository[ServiceAccount]
    service_account_keys: InMemoryServiceAccountKeys
    refresh_tokens: InMemoryRefreshTokens
    login_failures: InMemoryLoginFailures
    signing_key_store: InMemorySigningKeys
    signing_keys: SigningKeyManager
    passwords: Passwords
    organizations: FakeOrganizationDirectory
    patients: FakePatientDirectory
    trail: RecordingAuditTrail
    authentication: AuthenticationService
    management: IdentityService

    async def add_user(
        self,
        organization: str,
        user_id: str,
        role: Role,
        *,
        password: str = "a long enough password",
        patient: str = "",
        disabled: bool = False,
        username: str = "",
    ) -> User:
        """Seeds a user directly, as another writer would."""
        at = self.clock()
        user = User(
            id=f"{organization}/users/{user_id}",
            organization=organization,
            username=username or f"{user_id}@{organization.split('/')[1]}.test",
            display_name=user_id.title(),
            role=role,
            password_hash=await self.passwords.hash(password),
            create_time=at,
            update_time=at,
            patient=patient,
            disabled=disabled,
        )
        self.users.put(user)
        return user


def principal_of(user: User) -> Principal:
    return Principal(subject=user.name, organization=user.organization, role=user.role, patient=user.patient)


def member(organization: str, role: Role, user_id: str = "someone", patient: str = "") -> Principal:
    return Principal(subject=f"{organization}/users/{user_id}", organization=organization, role=role, patient=patient)


def make_identity(
    *,
    clock: FakeClock | None = None,
    settings: IdentitySettings | None = None,
    hasher: PasswordHasher | None = None,
    organizations: Iterable[str] = (MANUFACTURER, ORG_A, ORG_B),
    patients: Iterable[str] = (),
    cache_seconds: float = 0.0,
) -> Identity:
    clock = clock or FakeClock()
    settings = settings or IdentitySettings()
    token_settings = TokenSettings()
    users = InMemoryUsers()
    service_accounts: InMemoryRepository[ServiceAccount] = InMemoryRepository("service_account")
    service_account_keys = InMemoryServiceAccountKeys()
    refresh_tokens = InMemoryRefreshTokens()
    login_failures = InMemoryLoginFailures()
    signing_key_store = InMemorySigningKeys()
    signing_keys = SigningKeyManager(
        signing_key_store,
        access_token_ttl=settings.access_token_ttl,
        publish_lead=settings.jwks_publish_lead,
        rotation_period=settings.signing_key_rotation,
        clock=clock,
        cache_seconds=cache_seconds,
        min_reload_seconds=0.0,
    )
    passwords = Passwords(hasher or cheap_hasher())
    directory = FakeOrganizationDirectory(organizations)
    patient_directory = FakePatientDirectory(patients)
    trail = RecordingAuditTrail(service="identity")
    issuer = TokenIssuer(signing_keys, token_settings, settings.access_token_ttl, clock)
    authentication = AuthenticationService(
        users=users,
        service_accounts=service_accounts,
        service_account_keys=service_account_keys,
        refresh_tokens=refresh_tokens,
        login_failures=login_failures,
        passwords=passwords,
        issuer=issuer,
        signing_keys=signing_keys,
        trail=trail,
        settings=settings,
        clock=clock,
    )
    management = IdentityService(
        users=users,
        service_accounts=service_accounts,
        service_account_keys=service_account_keys,
        refresh_tokens=refresh_tokens,
        login_failures=login_failures,
        passwords=passwords,
        organizations=directory,
        patients=patient_directory,
        signing_keys=signing_keys,
        trail=trail,
        settings=settings,
        clock=clock,
    )
    return Identity(
        clock=clock,
        settings=settings,
        token_settings=token_settings,
        users=users,
        service_accounts=service_accounts,
        service_account_keys=service_account_keys,
        refresh_tokens=refresh_tokens,
        login_failures=login_failures,
        signing_key_store=signing_key_store,
        signing_keys=signing_keys,
        passwords=passwords,
        organizations=directory,
        patients=patient_directory,
        trail=trail,
        authentication=authentication,
        management=management,
    )
